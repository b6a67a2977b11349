"""``python -m mnist_classifier`` is the same as the ``mnist`` command: both start at :func:`run`."""

import gc

from . import cpuload


def run() -> int:
    """Import the command line with the cyclic garbage collector paused, then run it.

    The thread policy's reading of how busy the cores are starts first (``cpuload.mark_start``): the import
    is its measuring window, so the policy need not wait 0.1 s for one later.

    Importing torch creates hundreds of thousands of long-lived objects, and as their number grows the
    collector walks them all again: 5 full collections, 0.37-0.44 s of collecting in all per `mnist train
    --epochs 1`, against 2 and 0.08-0.11 s this way (benchmarks/gc_startup.py, BENCHMARKS.md). Nothing
    imported is garbage, and every object is still freed by its reference count as usual.
    """
    cpuload.mark_start()
    gc.disable()
    try:
        from .cli import entry
    finally:
        gc.freeze()  # the imported objects stay out of later collections' scans
        gc.enable()
    return entry()


if __name__ == "__main__":
    raise SystemExit(run())
