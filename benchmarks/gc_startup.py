"""The cyclic garbage collector's work in one `mnist train` process: started the old way (import the command
line, then run it) and through ``mnist_classifier.__main__.run``, which imports it with the collector paused
and freezes the imported objects.

Each start runs as its own process, alternating. A gc callback installed before anything is imported sums
the collections of each generation and their seconds; the process's wall time is printed beside them.
The command is `mnist train --epochs 1` (the whole guide CNN epoch unless --train-subset is given).

    .venv/bin/python benchmarks/gc_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

# Runs first in the child: counts every collection by generation, then starts the command (argv[1]: how).
CHILD = """
import gc, json, sys, time
counts, seconds, started = [0, 0, 0], [0.0, 0.0, 0.0], [0.0]
def watch(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        counts[info["generation"]] += 1
        seconds[info["generation"]] += time.perf_counter() - started[0]
gc.callbacks.append(watch)
how, sys.argv = sys.argv[1], ["mnist"] + sys.argv[2:]
if how == "run":
    from mnist_classifier.__main__ import run as start
else:
    from mnist_classifier.cli import entry as start
code = start()
print(json.dumps({"collections": counts, "seconds": [round(s, 4) for s in seconds]}), file=sys.stderr)
sys.exit(code)
"""


def one(how: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", CHILD, how, "train", "--epochs", "1", "--data-dir", args.data_dir,
               "--out", f"{tmp}/run", "--train-subset", str(args.train_subset)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    gc_stats = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"start": how, "wall_seconds": round(wall, 2), "gc_seconds": round(sum(gc_stats["seconds"]), 3), **gc_stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-subset", type=int, default=0, help="0: all 60,000 training images")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"import-then-entry": [], "run": []}
    for _ in range(args.rounds):
        for how in rows:
            row = one(how, args)
            rows[how].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({how: {"gc_seconds_median": statistics.median(r["gc_seconds"] for r in runs),
                            "wall_seconds_median": statistics.median(r["wall_seconds"] for r in runs)}
                      for how, runs in rows.items()}))


if __name__ == "__main__":
    main()
