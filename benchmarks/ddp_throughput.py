"""Training throughput of 1 process against N processes (torchrun, gloo on CPU), same global batch.

Each configuration trains the guide recipe for ``--epochs`` in a fresh process group; images per second is
the training set size times epochs over the training-loop seconds that `mnist train` reports. Prints one
JSON line per configuration.

    .venv/bin/python benchmarks/ddp_throughput.py [--nprocs 1 2] [--epochs 1] [--batch-size 64]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads-per-process", type=int, default=None,
                        help="OMP threads per process (torchrun's default is 1)")
    args = parser.parse_args()
    for n in args.nprocs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            train = ["-m", "mnist_classifier", "train", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                     "--device", "cpu", "--data-dir", args.data_dir, "--out", str(out)]
            if n == 1:
                cmd = [sys.executable, *train]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *train]
            env = None
            if args.threads_per_process:
                import os

                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_process)}
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            summary = json.loads((out / "summary.json").read_text())
        print(json.dumps({"benchmark": "ddp_throughput", "processes": n, "epochs": args.epochs,
                          "global_batch": args.batch_size, "train_seconds": summary["train_seconds"],
                          "images_per_second": round(60000 * args.epochs / summary["train_seconds"]),
                          "test_accuracy": summary["test_accuracy"],
                          "threads_per_process": args.threads_per_process or ("torch default" if n == 1 else 1)}),
              flush=True)


if __name__ == "__main__":
    main()
