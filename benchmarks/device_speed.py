"""Training speed on one device (any CUDA GPU, or the CPU).

1. time to 99 % test accuracy: the fast recipe, epoch by epoch, summing training-loop seconds (evaluation
   excluded, device synchronised) until the test accuracy first reaches 99 %;
2. the guide recipe's 5 epochs (the guide says 30-60 s on a GPU): training-loop seconds and accuracy.

Prints one JSON line per result. Data must already be in --data-dir (run `mnist data` first; the device
machine has no internet).

    .venv/bin/python benchmarks/device_speed.py --device cuda [--data-dir data] [--repeats 3]
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mnist_classifier.config import TrainConfig, parse_overrides
from mnist_classifier.data import load_mnist
from mnist_classifier.device import select_device
from mnist_classifier.training import fit


def run(recipe: str, device: torch.device, splits, data_dir: str, **overrides) -> dict:
    cfg = TrainConfig.from_recipe(recipe, device=device.type, data_dir=data_dir, log_every=10**9, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(cfg, splits, device, Path(tmp))
        rows = json.loads(json.dumps(torch.load(Path(tmp) / "last.pt", weights_only=True)["metrics"]))
    return {"summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"],
                        help="autocast settings to time (auto = bf16 where native)")
    parser.add_argument("--fast-variant", action="append", default=[], metavar="KEY=VALUE,...",
                        help="also time the fast recipe with these overrides, e.g. batch_size=512,lr=0.04")
    parser.add_argument("--set", default="", metavar="KEY=VALUE,...",
                        help="overrides for every run, e.g. cuda_graphs=true")
    args = parser.parse_args()
    device = select_device(args.device)
    splits = load_mnist(args.data_dir, download=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    common = parse_overrides(TrainConfig, args.set)
    run("fast", device, splits, args.data_dir, **{**common, "epochs": 1})  # warm-up: kernels, allocator, autotuning
    variants = [common] + [{**common, **parse_overrides(TrainConfig, spec)} for spec in args.fast_variant]
    for precision in args.precisions:
        for variant in variants:
            for r in range(args.repeats):
                time_to_99(device, splits, args.data_dir, name, r, precision, variant)
        for r in range(args.repeats):
            result = run("guide", device, splits, args.data_dir, seed=r, precision=precision, **common)
            print(json.dumps({"benchmark": "guide_recipe_5_epochs", "device": name, "seed": r, "overrides": common,
                              "precision": result["summary"]["precision"],
                              "train_seconds": result["summary"]["train_seconds"],
                              "total_seconds": result["summary"]["total_seconds"],
                              "test_accuracy": result["summary"]["test_accuracy"]}), flush=True)


def time_to_99(device, splits, data_dir: str, name: str, seed: int, precision: str, overrides: dict) -> None:
    """Train the fast recipe; sum training-loop seconds epoch by epoch until the test accuracy reaches 99 %."""
    result = run("fast", device, splits, data_dir, seed=seed, precision=precision, **overrides)
    elapsed, reached = 0.0, None
    for row in result["rows"]:
        elapsed += row["seconds"]
        if row["test_accuracy"] >= 99.0:
            reached = round(elapsed, 3)
            break
    print(json.dumps({"benchmark": "time_to_99", "device": name, "precision": result["summary"]["precision"],
                      "overrides": overrides, "seed": seed, "seconds": reached,
                      "epoch_seconds": [row["seconds"] for row in result["rows"]],
                      "epoch_accuracy": [row["test_accuracy"] for row in result["rows"]]}), flush=True)


if __name__ == "__main__":
    main()
