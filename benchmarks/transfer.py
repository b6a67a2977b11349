"""Transfer learning on small data, side by side: EfficientNet-Lite0 from ImageNet weights (every layer
fine-tuned, and the backbone frozen) against the same network from scratch and against bn-cnn with
augmentation, on a fixed class-balanced subset of N training images per class, scored on the full test set.

Each run trains with `fit` (testing each epoch on the first 500 test images only, to keep the loop cheap),
then its model.pt is scored on all test images with `evaluate_checkpoints`. One JSON line per run, then one
summary line per (data set, N, method) with the mean over seeds.

    .venv/bin/python benchmarks/transfer.py --datasets mnist fashion-mnist --per-class 10 100 --seeds 0
    .venv/bin/python benchmarks/transfer.py --per-class 10 100 1000 --seeds 0 1 2     (the full grid: hours)
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import load_dataset
from mnist_classifier.evaluation import evaluate_checkpoints
from mnist_classifier.experiments import run_seeds

METHODS = {  # name -> the TrainConfig fields that make it
    "pretrained": {"model": "efficientnet-lite0", "pretrained": True},
    "pretrained-frozen": {"model": "efficientnet-lite0", "pretrained": True, "freeze_backbone": True},
    "pretrained-augment": {"model": "efficientnet-lite0", "pretrained": True, "augment": True},  # bn-cnn's augmentation
    # why is pretrained not further ahead? the input size (64 px by default) and the learning rate, one at a time
    "pretrained-96px": {"model": "efficientnet-lite0", "pretrained": True, "input_size": 96},
    "pretrained-128px": {"model": "efficientnet-lite0", "pretrained": True, "input_size": 128},
    "pretrained-lr1e-3": {"model": "efficientnet-lite0", "pretrained": True, "lr": 0.001},
    "same-net-scratch": {"model": "efficientnet-lite0"},
    "same-net-scratch-128px": {"model": "efficientnet-lite0", "input_size": 128},  # the fair match for 128 px
    "bn-cnn-augment": {"model": "bn-cnn", "augment": True, "dropout": 0.25},
}


def epochs_for(per_class: int) -> int:
    """About 120-1,300 optimizer steps at batch 32, whatever the size: few images need more passes."""
    return {10: 30, 100: 10}.get(per_class, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["pretrained", "pretrained-frozen", "same-net-scratch",
                                                          "bn-cnn-augment"],
                        choices=list(METHODS))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="runs/transfer")
    args = parser.parse_args()
    device = torch.device("cpu")
    results: dict[tuple, list] = {}
    for name in args.datasets:
        full = load_dataset(name, args.data_dir)
        for per_class in args.per_class:
            small = full.class_balanced(per_class, n_test=500)
            for method in args.methods:
                cfg = TrainConfig(dataset=name, epochs=epochs_for(per_class), batch_size=32, device="cpu",
                                  log_every=10**9, **{"lr": 0.003, **METHODS[method]})
                out = Path(args.out) / name / f"{per_class}-per-class" / method
                runs = run_seeds(cfg, args.seeds, small, device, out)
                for summary in runs.summaries:
                    score = evaluate_checkpoints([Path(summary["run_dir"]) / "model.pt"], device=device, splits=full)
                    row = {"dataset": name, "per_class": per_class, "method": method, "seed": summary["seed"],
                           "epochs": cfg.epochs, "test_accuracy": round(score.accuracy, 2),
                           "train_seconds": summary["train_seconds"], "run_seconds": round(summary["total_seconds"], 1)}
                    results.setdefault((name, per_class, method), []).append(row)
                    print(json.dumps(row), flush=True)
    for (name, per_class, method), rows in results.items():
        accs = [r["test_accuracy"] for r in rows]
        print(json.dumps({"summary": True, "dataset": name, "per_class": per_class, "method": method,
                          "seeds": len(rows), "accuracy_mean": round(statistics.mean(accs), 2), "accuracies": accs,
                          "train_seconds_mean": round(statistics.mean(r["train_seconds"] for r in rows), 1)}))


if __name__ == "__main__":
    main()
