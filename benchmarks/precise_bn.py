"""Precise batch norm (`--precise-bn`, on by default) against the running averages of training (`--precise-bn 0`).

Two parts, each printing one JSON line per run and a summary line per setting:

* ``shapes``: issue 22's failing case, bn-cnn on the generated 96-image shapes folder (15 epochs, lr 0.003,
  batch 16), through the real `mnist train`, per seed and per OMP_NUM_THREADS, both ways.
* ``recipe``: a recipe on MNIST, both ways, per seed, alternating, in one process: test accuracy, the
  training loop's seconds and the seconds spent recomputing the statistics (``precise_bn_seconds``).

    .venv/bin/python benchmarks/precise_bn.py shapes --seeds 0 1 2 3 4 --threads 1 2 3
    .venv/bin/python benchmarks/precise_bn.py recipe --recipe fast --seeds 0 1 2
    .venv/bin/python benchmarks/precise_bn.py recipe --recipe best --seeds 0 --epochs 1   # the cost of an epoch
    .venv/bin/python benchmarks/precise_bn.py once --recipe best --seeds 0 1 2   # one training per seed

``once`` trains each seed a single time, with the running averages, and then recomputes the statistics of
the model it saved exactly as `fit` does after the last epoch (the first 4,096 images of that epoch's
shuffle, unaugmented, in batches of the recipe's size). That is the same model precise BN would have handed
back, because the statistics never reach the weights (training scores batches by their own statistics; a
test checks the weights are equal bit for bit), at half the cost of training both ways. For the 30-epoch
best recipe that is the difference between one and two CPU-hours per seed pair.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from shapes import shapes_folder  # noqa: E402

SETTINGS = {"running averages (--precise-bn 0)": "0", "precise BN (the default, 4,096 images)": "4096"}


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def shapes(seeds: list[int], threads: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shapes"
        shapes_folder(root)
        results: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for t in threads:
            for seed in seeds:
                for name, n in SETTINGS.items():
                    out = Path(tmp) / f"run-{t}-{seed}-{n}"
                    env = {**os.environ, "OMP_NUM_THREADS": str(t)}
                    proc = subprocess.run(
                        [sys.executable, "-m", "mnist_classifier", "train", "--dataset", f"folder:{root}",
                         "--preprocess", "resize", "--image-size", "32", "--model", "bn-cnn", "--epochs", "15",
                         "--lr", "0.003", "--batch-size", "16", "--device", "cpu", "--seed", str(seed),
                         "--precise-bn", n, "--out", str(out)], capture_output=True, text=True, env=env)
                    if proc.returncode:
                        raise SystemExit(proc.stderr)
                    summary = json.loads((out / "summary.json").read_text())
                    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
                    col = rows[0].index("test_accuracy")
                    lowest_after_5 = min(float(r[col]) for r in rows[1:][4:])
                    results[name].append(summary["test_accuracy"])
                    print(json.dumps({"threads": t, "seed": seed, "setting": name,
                                      "test_accuracy": summary["test_accuracy"], "lowest_epoch_5_on": lowest_after_5,
                                      "warned": "warning:" in proc.stderr}), flush=True)
        for name, accs in results.items():
            print(f"{name}: final test accuracy {spread(accs)}")


def recipe(name: str, seeds: list[int], data_dir: str, epochs: int | None) -> None:
    import torch

    from mnist_classifier.config import TrainConfig
    from mnist_classifier.data import load_dataset
    from mnist_classifier.training import fit

    splits = load_dataset("mnist", data_dir)
    table: dict[str, dict[str, list[float]]] = {s: {"acc": [], "train": [], "bn": []} for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for setting, n in SETTINGS.items():
                cfg = TrainConfig.from_recipe(name, seed=seed, precise_bn=int(n), device="cpu",
                                              **({"epochs": epochs} if epochs else {}))
                run = Path(tmp) / f"{seed}-{n}"
                summary = fit(cfg, splits, torch.device("cpu"), run)
                for key, field in (("acc", "test_accuracy"), ("train", "train_seconds"), ("bn", "precise_bn_seconds")):
                    table[setting][key].append(summary[field])
                print(json.dumps({"recipe": name, "seed": seed, "setting": setting,
                                  **{k: summary[k] for k in ("test_accuracy", "train_seconds", "precise_bn_seconds")}}),
                      flush=True)
    for setting, cols in table.items():
        cost = 100 * statistics.median(b / t for b, t in zip(cols["bn"], cols["train"]))
        print(f"{name} / {setting}: test accuracy {spread(cols['acc'])}; training loop median "
              f"{statistics.median(cols['train']):.1f} s; recomputing median {statistics.median(cols['bn']):.2f} s "
              f"({cost:.1f} % of the training loop)")


def once(name: str, seeds: list[int], data_dir: str, epochs: int | None) -> None:
    import dataclasses
    import time

    import torch

    from mnist_classifier.config import TrainConfig
    from mnist_classifier.data import load_dataset, model_input
    from mnist_classifier.evaluation import evaluate_model
    from mnist_classifier.models import load_model
    from mnist_classifier.training import fit
    from mnist_classifier.training.epoch import epoch_permutation
    from mnist_classifier.training.precise_bn import recalibrate, sample_batches

    cpu = torch.device("cpu")
    splits = load_dataset("mnist", data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            cfg = TrainConfig.from_recipe(name, seed=seed, device="cpu", tensorboard=False,
                                          **({"epochs": epochs} if epochs else {}))
            n = cfg.precise_bn  # the images the default recomputes from; training itself keeps the running averages
            if cfg.val_size or cfg.train_subset:
                raise SystemExit("once: the recipe must train on all training images (no --val-size, no subset)")
            run = Path(tmp) / str(seed)
            summary = fit(dataclasses.replace(cfg, precise_bn=0), splits, cpu, run)
            model, info, _ = load_model(run / "model.pt", cpu)
            train_x = model_input(splits.train_images, info.mean, info.std, cpu)  # (60000, 1, 28, 28) float32
            test_x = model_input(splits.test_images, info.mean, info.std, cpu)
            before = evaluate_model(model, test_x, splits.test_labels)["accuracy"]
            t0 = time.perf_counter()
            perm = epoch_permutation(len(train_x), seed, cfg.epochs)
            recalibrate(model, sample_batches(train_x, perm[:n], max(2, cfg.batch_size)))
            seconds = time.perf_counter() - t0
            after = evaluate_model(model, test_x, splits.test_labels)["accuracy"]
            row = {"recipe": name, "seed": seed, "epochs": cfg.epochs, "threads": torch.get_num_threads(),
                   "summary_test_accuracy": summary["test_accuracy"], "running_averages": round(before, 4),
                   "precise_bn": round(after, 4), "train_seconds": summary["train_seconds"],
                   "precise_bn_seconds": round(seconds, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for key in ("running_averages", "precise_bn"):
        print(f"{name} / {key}: test accuracy {spread([r[key] for r in rows])}")
    cost = [100 * r["precise_bn_seconds"] / r["train_seconds"] for r in rows]
    print(f"{name}: recomputing once costs {statistics.median(cost):.2f} % of the training loop (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("shapes", "recipe", "once"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3], help="shapes: OMP_NUM_THREADS values")
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=None, help="recipe: fewer epochs, to time a long recipe's epoch")
    args = parser.parse_args()
    if args.part == "shapes":
        shapes(args.seeds, args.threads)
    elif args.part == "once":
        once(args.recipe, args.seeds, args.data_dir, args.epochs)
    else:
        recipe(args.recipe, args.seeds, args.data_dir, args.epochs)


if __name__ == "__main__":
    main()
