"""What a sweep costs beyond its training, and how many trials an hour --jobs 1 and --jobs 2 complete.

1. Overhead: a sweep of N tiny trials, in this process; its wall time minus the sum of its runs' own
   ``total_seconds`` (fit from start to summary), divided by N: study storage, trial bookkeeping, trial.json.
2. Throughput: the same sweep of guide-CNN trials (1 epoch on --subset images, 1 seed, no pruning) at
   --jobs 1 (one process, all cores' threads) and --jobs 2 (two processes, the cores split), alternated
   --reps times; completed trials per hour, median over reps.

    .venv/bin/python benchmarks/sweep_speed.py --data-dir data
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import load_dataset
from mnist_classifier.experiments import SweepSpec, parse_space, sweep


def overhead(data_dir: str, trials: int) -> dict:
    base = TrainConfig(train_subset=256, val_size=64, epochs=1, device="cpu", data_dir=data_dir, eval_batch_size=2000,
                       tensorboard=True)
    spec = SweepSpec(params=parse_space(["lr=log:1e-4..1e-2"]), base=base, trials=trials, sampler="tpe", pruner="median")
    load_dataset("mnist", data_dir)  # warm the page cache: the sweep's own load is counted in its overhead
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = sweep(spec, Path(tmp) / "s", jobs=1)
        wall = time.perf_counter() - t0
        fits = sum(json.loads((Path(tmp) / "s" / d / "summary.json").read_text())["total_seconds"]
                   for t in result.trials for d in t.run_dirs if (Path(tmp) / "s" / d / "summary.json").exists())
    return {"trials": trials, "wall_seconds": round(wall, 2), "fit_seconds": round(fits, 2),
            "overhead_per_trial_seconds": round((wall - fits) / trials, 3)}


def throughput(data_dir: str, jobs: int, trials: int, subset: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mnist_classifier", "sweep", "--out", f"{tmp}/s", "--data-dir", data_dir,
               "--device", "cpu", "--epochs", "1", "--train-subset", str(subset), "--val-size", "5000",
               "--param", "lr=log:3e-4..3e-3", "--sampler", "random", "--pruner", "none", "--trials", str(trials),
               "--jobs", str(jobs), "--json"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    assert json.loads(out.stdout)["trials"]["complete"] == trials
    return trials / wall * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--overhead-trials", type=int, default=20)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps({"benchmark": "sweep overhead", "threads": torch.get_num_threads(),
                      **overhead(args.data_dir, args.overhead_trials)}), flush=True)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.reps):
        for jobs in (1, 2):
            rates[jobs].append(throughput(args.data_dir, jobs, args.trials, args.subset))
            print(json.dumps({"jobs": jobs, "trials_per_hour": round(rates[jobs][-1], 1)}), flush=True)
    med = {j: statistics.median(r) for j, r in rates.items()}
    print(json.dumps({"benchmark": "sweep throughput", "trials_per_hour_median": {j: round(v, 1) for j, v in med.items()},
                      "jobs2_over_jobs1": round(med[2] / med[1], 3), "runs": rates}))


if __name__ == "__main__":
    main()
