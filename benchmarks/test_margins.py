"""How far above its threshold each accuracy-asserting test's training run lands, over seeds and thread counts.

Floating-point sums differ with the CPU and the number of threads, so a test that passes with seed 0 on one
machine proves little about the next. Each case below is the training run of a test in tests/, with the
accuracy that test asks for; every (seed, OMP_NUM_THREADS) pair runs the real `mnist train` and the table
gives min / mean / max and the margin (min - threshold). The thresholds in the tests are set from these.

    .venv/bin/python benchmarks/test_margins.py --seeds 0 1 2 3 4 --threads 1 2 3
    .venv/bin/python benchmarks/test_margins.py --cases shapes graphs --seeds 0 1 2 3 4 --threads 1 2 3
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from shapes import shapes_folder  # noqa: E402

SHAPES = "{shapes}"  # replaced by the generated folder
DATA_DIR = str(REPO / "data")  # --data-dir


def summary_accuracy(run: Path, tmp: Path) -> dict[str, float]:
    return {"test accuracy": json.loads((run / "summary.json").read_text())["test_accuracy"]}


def printed_and_tta(run: Path, tmp: Path) -> dict[str, float]:
    """What test_predict and test_recipes judge the shared trained checkpoint by: the 120 printed digits
    through `mnist predict`, and the shift-TTA accuracy on the first 500 test images."""
    import torch

    from mnist_classifier.data import load_dataset, model_input
    from mnist_classifier.evaluation import metrics_from_logits, predict_log_probs
    from mnist_classifier.models import load_model
    from printed_digits import render_set

    folder = tmp / "printed"
    truth = {str(p): d for p, d in render_set(folder, per_digit=12)}  # the same 120 renders each time (seed 0)
    proc = subprocess.run([sys.executable, "-m", "mnist_classifier", "predict", str(folder), "--checkpoint",
                           str(run / "model.pt"), "--json", "--device", "cpu"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    printed = 100 * sum(r["digit"] == truth[r["path"]] for r in results) / len(results)
    splits = load_dataset("mnist", DATA_DIR)
    model, info, _ = load_model(run / "model.pt", torch.device("cpu"))
    to_input = lambda v: model_input(v, info.mean, info.std, torch.device("cpu"))  # noqa: E731
    tta = predict_log_probs(model, splits.test_images[:500], to_input, 1)
    return {"printed digits": printed, "TTA, 500 images": metrics_from_logits(tta, splits.test_labels[:500])["accuracy"]}


def transfer_notebook(seed: int, threads: int, tmp: Path) -> dict[str, float]:
    """notebooks/transfer_learning.ipynb in a real kernel with SEED set: its photos, splits and both trainings
    follow the seed. The kernel inherits OMP_NUM_THREADS from this process's environment at start."""
    import re

    from test_notebook import TRANSFER, _run

    os.environ["OMP_NUM_THREADS"] = str(threads)
    out = tmp / f"notebook-{seed}-{threads}"
    printed, _ = _run(TRANSFER, f"SEED = {seed}\nPHOTO_DIR = {str(out / 'photos')!r}\nOUT_DIR = {str(out / 'out')!r}")
    found = dict(re.findall(r"^\s*(frozen|fine-tuned): +([\d.]+)%", printed, re.M))
    return {name: float(value) for name, value in found.items()}


def speedups(seed: int, threads: int, tmp: Path) -> dict[str, float]:
    """test_speedups: the guide CNN after 20,000 images through the plain step, and how far the kept step
    (fp32, then bf16) lands from it, in points; in this process at ``threads`` torch threads. Its test
    bounds each difference both ways (0.3 and 0.5 points); the table's floor is the lower side."""
    import torch

    from mnist_classifier.data import load_dataset
    from test_speedups import train_and_score

    torch.set_num_threads(threads)
    splits = load_dataset("mnist", DATA_DIR)
    plain = train_and_score(splits, "plain", seed, 20_000)
    return {"plain": plain, "kept - plain": round(train_and_score(splits, "kept", seed, 20_000) - plain, 2),
            "bf16 - plain": round(train_and_score(splits, "bf16", seed, 20_000) - plain, 2)}


@dataclass(frozen=True)
class Case:
    flags: list[str] | None  # `mnist train` flags beyond seed, device, data and output; None: ``run`` does all
    floors: dict[str, float]  # what is measured -> the floor its test asserts
    measure: Callable[[Path, Path], dict[str, float]] = summary_accuracy  # (run folder, scratch) -> values
    run: Callable[[int, int, Path], dict[str, float]] | None = None  # (seed, threads, scratch) -> values


ACC = "test accuracy"
EFFICIENTNET = ["--model", "efficientnet-lite0", "--pretrained", "--batch-size", "32"]
CASES = {
    "shapes": Case(["--dataset", f"folder:{SHAPES}", "--preprocess", "resize", "--image-size", "32", "--model",
                    "bn-cnn", "--epochs", "15", "--lr", "0.003", "--batch-size", "16"], {ACC: 90.0}),  # test_datasets
    "graphs": Case(["--train-subset", "3000", "--epochs", "2", "--cuda-graphs", "--schedule", "onecycle", "--ema",
                    "0.99"], {ACC: 85.0}),  # test_graphs: a --cuda-graphs run on a CPU
    "small": Case(["--train-subset", "2000", "--epochs", "1"], {ACC: 70.0}),  # test_train: the short run
    "sgd": Case(["--train-subset", "2000", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.01"], {ACC: 45.0}),
    "rmsprop": Case(["--train-subset", "2000", "--epochs", "1", "--optimizer", "rmsprop", "--lr", "0.0003"],
                    {ACC: 80.0}),
    "fashion": Case(["--dataset", "fashion-mnist", "--epochs", "1"], {ACC: 85.0}),  # test_datasets, 1 epoch
    # test_distributed (2 processes train the same model) and the notebook (> 95)
    "guide-1-epoch": Case(["--epochs", "1"], {ACC: 97.5}),
    "guide": Case([], {ACC: 98.2}),  # test_train: the full default run
    "fast": Case(["--recipe", "fast"], {ACC: 98.8}),  # test_recipes: the fast recipe, one epoch (auto precision)
    "fast-fp32": Case(["--recipe", "fast", "--precision", "fp32"], {ACC: 98.8}),  # as a CPU without native bf16
    # conftest's trained_checkpoint (the guide's CNN, 2 epochs), judged by test_predict and test_recipes
    "checkpoint": Case(["--epochs", "2"], {"printed digits": 85.0, "TTA, 500 images": 95.0}, printed_and_tta),
    # test_pretrained: the head on 1,000 MNIST images, and fine-tuning on 500 Fashion-MNIST images
    # (scored on the first 2,000 test images since 2026-12-02, as the tests do: 28 s per 10,000 at one thread)
    "pretrained-frozen": Case([*EFFICIENTNET, "--freeze-backbone", "--train-subset", "1000", "--epochs", "1",
                               "--lr", "0.003", "--test-subset", "2000"], {ACC: 60.0}),
    "pretrained-fashion": Case([*EFFICIENTNET, "--dataset", "fashion-mnist", "--train-subset", "500", "--epochs", "2",
                                "--test-subset", "2000"], {ACC: 40.0}),
    "transfer-notebook": Case(None, {"frozen": 90.0, "fine-tuned": 90.0}, run=transfer_notebook),  # test_notebook
    "speedups": Case(None, {"plain": 95.0, "kept - plain": -0.3, "bf16 - plain": -0.5}, run=speedups),  # test_speedups
}


def train(flags: list[str], seed: int, threads: int, tmp: Path) -> Path:
    out = tmp / f"run-{seed}-{threads}-{abs(hash(tuple(flags)))}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "mnist_classifier", "train", *flags, "--seed", str(seed),
                           "--device", "cpu", "--data-dir", DATA_DIR, "--out", str(out), "--log-every", "100000",
                           "--no-tensorboard"], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return out


def measure(case: Case, seed: int, threads: int, tmp: Path) -> dict[str, float]:
    if case.run is not None:
        return case.run(seed, threads, tmp)
    flags = [f.replace(SHAPES, str(tmp / "shapes")) for f in case.flags]
    run = train(flags, seed, threads, tmp)
    values = case.measure(run, tmp)
    shutil.rmtree(run)  # an EfficientNet run folder is tens of MB
    return values


def main() -> None:
    global DATA_DIR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--data-dir", default=DATA_DIR)
    args = parser.parse_args()
    DATA_DIR = args.data_dir
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shapes_folder(tmp / "shapes")
        for name in args.cases:
            case, values = CASES[name], {}
            for threads in args.threads:
                for seed in args.seeds:
                    got = measure(case, seed, threads, tmp)
                    for key, value in got.items():
                        values.setdefault(key, []).append(value)
                    print(json.dumps({"case": name, "seed": seed, "threads": threads, **got}), flush=True)
            for key, floor in case.floors.items():
                vals = values[key]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                print(f"{name} / {key}: min {min(vals):.2f} mean {statistics.mean(vals):.2f} ± {sd:.2f} max "
                      f"{max(vals):.2f} over {len(vals)} runs (seeds {args.seeds}, threads {args.threads}); "
                      f"floor {floor}: margin {min(vals) - floor:+.2f}", flush=True)


if __name__ == "__main__":
    main()
