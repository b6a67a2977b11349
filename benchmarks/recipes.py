"""Train a recipe with several seeds and print its accuracy (mean, min, max) and training-loop time.

One JSON line per seed, then a summary line. With ``--ensemble`` the seeds' models are also evaluated as
one ensemble (mean of probabilities), through `mnist evaluate`'s own code; ``--tta-shift 1`` adds the same
ensemble with shift test-time augmentation (`mnist evaluate --tta-shift 1`).

    .venv/bin/python benchmarks/recipes.py --recipe fast --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/recipes.py --recipe best --seeds 0 1 2 --ensemble --tta-shift 1 --out runs/best
    .venv/bin/python benchmarks/recipes.py --recipe guide --dataset fashion-mnist --seeds 0 1 2
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from mnist_classifier.config import TrainConfig, parse_overrides
from mnist_classifier.data import load_dataset
from mnist_classifier.device import select_device
from mnist_classifier.evaluation import evaluate_checkpoints
from mnist_classifier.experiments import run_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="mnist", help="any --dataset of `mnist train` (default: mnist)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default=None, help="folder for the runs (default: runs/recipe-<name>)")
    parser.add_argument("--ensemble", action="store_true")
    parser.add_argument("--tta-shift", type=int, default=0, help="with --ensemble: also report it with shift TTA of this radius")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (for a quick look)")
    parser.add_argument("--set", default="", metavar="KEY=VALUE,...", help="other overrides, e.g. model=res-cnn")
    args = parser.parse_args()

    device = select_device(args.device)
    splits = load_dataset(args.dataset, args.data_dir)
    suffix = "" if args.dataset == "mnist" else f"-{args.dataset}"
    out = Path(args.out or f"runs/recipe-{args.recipe}{suffix}")
    overrides = {"device": str(device), "data_dir": args.data_dir, "log_every": 10**9, "dataset": args.dataset,
                 **parse_overrides(TrainConfig, args.set), **({"epochs": args.epochs} if args.epochs else {})}
    cfg = TrainConfig.from_recipe(args.recipe, **overrides)

    def report(summary: dict) -> None:
        print(json.dumps({"recipe": args.recipe, "dataset": args.dataset, "seed": summary["seed"],
                          "test_accuracy": summary["test_accuracy"], "train_seconds": summary["train_seconds"],
                          "epochs": cfg.epochs, "best_epoch": summary.get("best_epoch"), "device": str(device),
                          "precision": summary["precision"]}), flush=True)

    results = run_seeds(cfg, args.seeds, splits, device, out, on_run=report).summaries
    accs = [r["test_accuracy"] for r in results]
    secs = [r["train_seconds"] for r in results]
    line = {"benchmark": "recipe", "recipe": args.recipe, "dataset": args.dataset, "seeds": args.seeds, "device": str(device),
            "accuracy_mean": round(statistics.mean(accs), 3), "accuracy_min": min(accs), "accuracy_max": max(accs),
            "train_seconds_mean": round(statistics.mean(secs), 2), "train_seconds_max": round(max(secs), 2)}
    if args.ensemble and len(results) > 1:
        paths = [Path(r["run_dir"]) / "model.pt" for r in results]
        plain = evaluate_checkpoints(paths, device=device, splits=splits)
        line["ensemble_accuracy"] = round(plain.accuracy, 3)
        if args.tta_shift:
            tta = evaluate_checkpoints(paths, device=device, tta_shift=args.tta_shift, splits=splits)
            line["tta_views"] = tta.tta_views
            line["ensemble_tta_accuracy"] = round(tta.accuracy, 3)
    print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
