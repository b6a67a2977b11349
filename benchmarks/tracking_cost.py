"""The time TensorBoard tracking adds to a run: every call into training/tracking.py timed inside one real
`fit` of the guide recipe (import of the writer, scalars, hparams, the confusion image, closing the files),
against the run's training loop. Whole-command pairs with and without --no-tensorboard are too noisy on a
shared VM to resolve a cost this small (see BENCHMARKS.md).

    .venv/bin/python benchmarks/tracking_cost.py --data-dir data
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import load_dataset
from mnist_classifier.training import fit, tracking

SPENT = [0.0]


def timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[0] += time.perf_counter() - t0
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--recipe", default="guide")
    args = parser.parse_args()
    assert "torch.utils.tensorboard" not in sys.modules  # its import is part of the cost
    for name in ("__init__", "step", "epoch", "finish", "close"):
        setattr(tracking.TensorBoardLog, name, timed(getattr(tracking.TensorBoardLog, name)))
    splits = load_dataset("mnist", args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_recipe(args.recipe, device="cpu", data_dir=args.data_dir, out=tmp)
        summary = fit(cfg, splits, torch.device("cpu"), Path(tmp))
    print(json.dumps({"benchmark": "tracking cost", "recipe": args.recipe, "threads": torch.get_num_threads(),
                      "tracking_seconds": round(SPENT[0], 3), "train_seconds": summary["train_seconds"],
                      "share_of_training": round(SPENT[0] / summary["train_seconds"], 4)}))


if __name__ == "__main__":
    main()
