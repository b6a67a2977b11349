"""Seed guide pipeline vs ``mnist train``, same settings (Adam, lr 0.001, batch 64, 5 epochs, test each epoch).

Each side runs as its own process, end to end (interpreter start to exit), alternating A, B, A, B so that
machine noise hits both. Prints one JSON line per round and a final summary line with the speed ratio.

    .venv/bin/python benchmarks/train_speed.py [--rounds 2] [--data-dir data] [--precision fp32]

--precision is passed to `mnist train` (default: its own, auto): fp32 on a CPU with native bf16 shows what a
CPU without it runs.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "mnist_classifier", "data", "--data-dir", args.data_dir], check=True,
                   capture_output=True)
    guide_t, ours_t, guide_acc, ours_acc = [], [], [], []
    for r in range(args.rounds):
        seconds, out = timed([sys.executable, str(HERE / "guide_pipeline.py"), "--data-dir", args.data_dir,
                              "--epochs", str(args.epochs), "--seed", str(r)])
        guide = json.loads(out.strip().splitlines()[-1])
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            seconds_ours, _ = timed([sys.executable, "-m", "mnist_classifier", "train", "--data-dir", args.data_dir,
                                     "--epochs", str(args.epochs), "--seed", str(r), "--out", str(run_dir),
                                     "--precision", args.precision])
            summary = json.loads((run_dir / "summary.json").read_text())
        guide_t.append(seconds); ours_t.append(seconds_ours)
        guide_acc.append(guide["accuracy"]); ours_acc.append(summary["test_accuracy"])
        print(json.dumps({"round": r, "guide_seconds": round(seconds, 2), "guide_accuracy": guide["accuracy"],
                          "mnist_train_seconds": round(seconds_ours, 2), "mnist_train_accuracy": summary["test_accuracy"],
                          "mnist_train_loop_seconds": summary["train_seconds"], "threads": summary["threads"]}), flush=True)
    g, o = statistics.median(guide_t), statistics.median(ours_t)
    print(json.dumps({
        "benchmark": "train_speed", "epochs": args.epochs, "rounds": args.rounds, "precision": args.precision,
        "guide_seconds_median": round(g, 2), "mnist_train_seconds_median": round(o, 2), "speedup": round(g / o, 2),
        "guide_accuracy_min": min(guide_acc), "mnist_train_accuracy_min": min(ours_acc),
        "both_at_least_98_5": min(guide_acc) >= 98.5 and min(ours_acc) >= 98.5,
    }))


if __name__ == "__main__":
    main()
