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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from shapes import shapes_folder  # noqa: E402

SHAPES = "{shapes}"  # replaced by the generated folder
CASES = {
    # test -> (mnist train flags, accuracy the test asks for)
    "shapes": (["--dataset", f"folder:{SHAPES}", "--preprocess", "resize", "--image-size", "32", "--model", "bn-cnn",
                "--epochs", "15", "--lr", "0.003", "--batch-size", "16"], 90.0),  # test_datasets: generated folder
    "graphs": (["--train-subset", "3000", "--epochs", "2", "--cuda-graphs", "--schedule", "onecycle", "--ema", "0.99"],
               85.0),  # test_graphs: a --cuda-graphs run on a CPU
    "small": (["--train-subset", "2000", "--epochs", "1"], 70.0),  # test_train: the short run
    "sgd": (["--train-subset", "2000", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.01"], 45.0),
    "rmsprop": (["--train-subset", "2000", "--epochs", "1", "--optimizer", "rmsprop", "--lr", "0.0003"], 80.0),
    "fashion": (["--dataset", "fashion-mnist", "--epochs", "1"], 85.0),  # test_datasets: Fashion-MNIST, 1 epoch
    "guide-1-epoch": (["--epochs", "1"], 97.5),  # test_distributed (2 processes train the same model) and the notebook (95)
    "guide": ([], 98.4),  # test_train: the full default run
    "fast": (["--recipe", "fast"], 98.8),  # test_recipes: the fast recipe, one epoch (auto precision)
    "fast-fp32": (["--recipe", "fast", "--precision", "fp32"], 98.8),  # the same, as a CPU without native bf16 runs it
}


def run_case(flags: list[str], seed: int, threads: int, tmp: Path, data_dir: str) -> float:
    out = tmp / f"run-{seed}-{threads}-{abs(hash(tuple(flags)))}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "mnist_classifier", "train", *flags, "--seed", str(seed),
                           "--device", "cpu", "--data-dir", data_dir, "--out", str(out), "--log-every", "100000"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads((out / "summary.json").read_text())["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--data-dir", default=str(REPO / "data"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shapes_folder(tmp / "shapes")
        for name in args.cases:
            flags, threshold = CASES[name]
            flags = [f.replace(SHAPES, str(tmp / "shapes")) for f in flags]
            accs = []
            for threads in args.threads:
                for seed in args.seeds:
                    acc = run_case(flags, seed, threads, tmp, args.data_dir)
                    accs.append(acc)
                    print(json.dumps({"case": name, "seed": seed, "threads": threads, "test_accuracy": acc}), flush=True)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{name}: min {min(accs):.2f} mean {statistics.mean(accs):.2f} ± {sd:.2f} max {max(accs):.2f} "
                  f"over {len(accs)} runs (seeds {args.seeds}, threads {args.threads}); threshold {threshold}: "
                  f"margin {min(accs) - threshold:+.2f}", flush=True)


if __name__ == "__main__":
    main()
