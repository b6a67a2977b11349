"""Issue 24's measurements for the CPU this runs on, one after the other: what BENCHMARKS.md gives per CPU.

The issue asks for the same rows on every CPU the project is built on, and the CPU changes from session to
session (Intel with AMX, Intel without, AMD Zen 3 and Zen 4 so far). This runs them all in one go, each
benchmark in its own process, with nothing else of ours running:

  roofline      benchmarks/roofline.py: GEMM and convolution ceilings, the guide step's share
  steps         benchmarks/step_variants.py: the guide step, one change at a time (batch 64)
  guide         benchmarks/train_speed.py --rounds R: the guide recipe against the guide's pipeline
  time-to-99    benchmarks/time_to_99.py --rounds R --fast-seeds 0 1 2 3 4: the fast recipe's time to 99 %
  contention    benchmarks/contention.py --reps 3: `mnist train --epochs 1` beside a busy core

Before each it measures, over 2 s, how many cores other work keeps busy (the thread policy's own reading),
so a noisy start is on record. It writes OUT/cpu.json (the CPU's name, family and model, whether it has
AVX2, AVX-512, AVX512-BF16 and AMX, its cores, torch's version), OUT/NAME.txt (what each benchmark printed)
and OUT/report.jsonl (one line per benchmark: the busy cores before it, its seconds, the JSON rows it
printed, its summary last).
Order and rounds are the ones BENCHMARKS.md quotes; --only picks some. `--as avx2` runs every benchmark as a CPU
with AVX2 and FMA but neither AVX-512 nor bf16 would (AMD Zen 1-3, most laptops): torch's own kernels, oneDNN,
MKL and the package's kernels are each held to AVX2 by their documented switch (AS below), and --precision auto
then picks fp32. `--as avx512` holds them to AVX-512 without AVX512-BF16 or AMX instead (Intel Skylake-SP to Ice
Lake). Either is the same cores running fewer instructions, a stand-in for such a CPU, not one. At --rounds 3 it took
13.5 minutes on a 2-core Zen 4 (2026-12-05), and 16.1 and 12.7 minutes (as it is, and --as avx512) on a 2-core Intel
Xeon Emerald Rapids (2026-12-06). Expect about twice that on a 2-core Zen 3, whose guide pipeline took 200 s a round.

    .venv/bin/python benchmarks/cpu_report.py --out cpu-report
    .venv/bin/python benchmarks/cpu_report.py --out cpu-report --only roofline contention
    .venv/bin/python benchmarks/cpu_report.py --out cpu-report-avx2 --as avx2
    .venv/bin/python benchmarks/cpu_report.py --out cpu-report-avx512 --as avx512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from mnist_classifier.cpuload import busy_cores, usable_cores

HERE = Path(__file__).resolve().parent
FLAGS = {"avx2": "avx2", "avx512f": "avx512", "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16"}
# what each benchmark's process is started with: avx2 for AMD Zen 1-3 and most laptops, avx512 for the Intel
# Xeons with AVX-512 but neither AVX512-BF16 nor AMX (Skylake-SP to Ice Lake), the CPU issue 24 was measured on
AS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
               "MNIST_NATIVE_ARCH": "x86-64-v3"},
      "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                 "MKL_ENABLE_INSTRUCTIONS": "AVX512", "MNIST_NATIVE_ARCH": "x86-64-v4"}}


def benchmarks(rounds: int, data_dir: str, run_as: str | None = None) -> dict[str, list[str]]:
    """Each benchmark's command line (after the interpreter), in the order they run."""
    data = ["--data-dir", data_dir]
    # held to a smaller instruction set, torch.compile is left out: under ATEN_CPU_CAPABILITY=avx2 on an AVX-512
    # CPU its generated backward handed scatter_reduce_ an index of 2.2e17 and the benchmark died (2026-12-05, CPU-4)
    steps = ["--skip", "compile"] if run_as else []
    return {
        "roofline": ["roofline.py"],
        "steps": ["step_variants.py", "--model", "guide-cnn", "--batch-size", "64", "--rounds", "5", *data, *steps],
        "guide": ["train_speed.py", "--rounds", str(rounds), *data],
        "time-to-99": ["time_to_99.py", "--rounds", str(rounds), "--fast-seeds", "0", "1", "2", "3", "4", *data],
        "contention": ["contention.py", "--reps", "3", *data],
    }


def cpu_info() -> dict:
    """What BENCHMARKS.md names a CPU by: its model name, family and model numbers, and its vector units."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name", platform.processor()), "vendor": fields.get("vendor_id"),
            "family": fields.get("cpu family"), "model": fields.get("model"), "cores": usable_cores(),
            **{name: flag in flags for flag, name in FLAGS.items()}, "torch": torch.__version__}


def json_rows(text: str) -> list[dict]:
    """Every line of ``text`` that is a JSON object: a benchmark's rows, its summary last."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_one(name: str, argv: list[str], out: Path) -> dict:
    busy = busy_cores(2.0)  # other work on our cores, over 2 s, before this benchmark starts
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / f"{name}.txt").write_text(proc.stdout + proc.stderr)
    return {"benchmark": name, "command": " ".join(["benchmarks/" + argv[0], *argv[1:]]),
            "busy_cores_before": round(busy, 2), "seconds": round(seconds, 1), "exit": proc.returncode,
            "rows": json_rows(proc.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cpu-report", help="folder for cpu.json, report.jsonl and the outputs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of train_speed.py and time_to_99.py")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--only", nargs="+", choices=list(benchmarks(1, "")), help="run only these")
    parser.add_argument("--as", dest="run_as", choices=sorted(AS), help="run as a CPU with only this instruction set")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(AS.get(args.run_as, {}))  # the benchmarks' processes inherit it
    info = {**cpu_info(), "run_as": args.run_as, "run_as_env": AS.get(args.run_as, {})}
    (out / "cpu.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({"cpu": info}), flush=True)
    chosen = {k: v for k, v in benchmarks(args.rounds, args.data_dir, args.run_as).items()
              if not args.only or k in args.only}
    with open(out / "report.jsonl", "a") as report:
        for name, argv in chosen.items():
            row = run_one(name, argv, out)
            report.write(json.dumps(row) + "\n")
            report.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
