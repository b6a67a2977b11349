"""Replay a finished unpruned sweep's learning curves through Optuna's pruners, in shuffled trial orders.

Each trial of the unpruned sweep (`benchmarks/experiments.sh pruning` writes sweeps/exp-prune-none) has its
validation accuracy and training-loop seconds per epoch in metrics.csv. Replayed one trial after another, a
pruner sees the same values it would have seen live, so its training-loop time (relative to all of it) and
the best validation accuracy it keeps can be compared across pruners and orders without training again.

    .venv/bin/python benchmarks/prune_replay.py sweeps/exp-prune-none --orders 1 2 3
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import optuna

PRUNERS = {
    "median, 5 start-up trials": lambda: optuna.pruners.MedianPruner(n_startup_trials=5),
    "median, 2 start-up trials": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
    "successive halving, eta 3": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    "hyperband, eta 3": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3, reduction_factor=3),
}


def curves(sweep_dir: Path) -> list[tuple[list[float], list[float]]]:
    out = []
    for run in sorted(sweep_dir.glob("trial-*")):
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        out.append(([float(r["val_accuracy"]) for r in rows], [float(r["seconds"]) for r in rows]))
    return out


def replay(trials, make_pruner, order: list[int]) -> tuple[float, int, float]:
    """(training-loop seconds spent, trials pruned, best validation accuracy of the complete trials)."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner())
    spent, pruned, best = 0.0, 0, 0.0
    for i in order:
        values, seconds = trials[i]
        trial = study.ask()
        for epoch, (value, secs) in enumerate(zip(values, seconds), 1):
            spent += secs
            trial.report(value, epoch)
            if epoch < len(values) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned += 1
                break
        else:
            study.tell(trial, max(values))
            best = max(best, max(values))
    return spent, pruned, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3], help="seeds of the shuffled orders")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = curves(args.sweep)
    total = sum(sum(s) for _, s in trials)
    for name, make in PRUNERS.items():
        for seed in args.orders:
            order = list(range(len(trials)))
            random.Random(seed).shuffle(order)
            spent, pruned, best = replay(trials, make, order)
            print(json.dumps({"pruner": name, "order_seed": seed, "time_vs_unpruned": round(spent / total, 3),
                              "pruned": pruned, "best_val_accuracy": best}))


if __name__ == "__main__":
    main()
