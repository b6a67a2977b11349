"""`mnist train --epochs 1` alone and beside one busy process, with the thread policy and with fixed threads.

A "busy process" is one Python loop spinning on a core (what a browser tab, a notebook kernel or a second
sweep job does to a learner's laptop). Cases run in turn, --reps times, so that drift hits them alike:

  alone-auto     nothing else running, threads chosen by the policy (all cores)
  busy-auto      one spinner, threads chosen by the policy (the cores left free)
  busy-N         one spinner, OMP_NUM_THREADS=N (N = all cores: what torch does by default)
  busy-1         one spinner, OMP_NUM_THREADS=1
  late-auto      the spinner starts --late-s seconds after the command (after its start-up reading), threads
                 chosen by the policy, which reads the cores again while it trains (device.LoadFollower)
  late-N         the same, OMP_NUM_THREADS=N: fixed threads, nothing followed

A suffix sets OpenMP's wait policy (read by torch's libgomp when torch is imported): "-passive" sets
OMP_WAIT_POLICY=PASSIVE (an idle thread sleeps at once), "-active" ACTIVE (it spins), and "-default" leaves
the variable unset (libgomp spins a while, then sleeps). Without a suffix, the `mnist` command's own choice.
--cases picks the cases, e.g. --cases alone-auto-default alone-auto-passive busy-2-default busy-2-passive.

Prints one JSON line per run (wall seconds of the whole command), then medians and ratios to the first case.

    .venv/bin/python benchmarks/contention.py --data-dir data --reps 3
    .venv/bin/python benchmarks/contention.py --data-dir data --reps 3 --cases alone-auto late-auto late-2 late-1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from mnist_classifier.device import usable_cores


def case_env(case: str) -> dict[str, str]:
    """The environment for ``case`` (e.g. "busy-2-passive"): OMP_NUM_THREADS and OMP_WAIT_POLICY as it says."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    _, threads, *policy = case.split("-")
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    if policy and policy[0] in ("passive", "active"):
        env["OMP_WAIT_POLICY"] = policy[0].upper()
    elif policy:  # "default": unset, and tell the command not to choose either
        env["OMP_WAIT_POLICY"] = ""
    return env


def spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(case: str, data_dir: str, epochs: int = 1, late_s: float = 3.0) -> float:
    env = case_env(case)
    spinner = spin() if case.startswith("busy") else None
    try:
        time.sleep(0.5)  # the spinner is running before training starts, as a neighbour would be
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "train", "--epochs", str(epochs),
                                      "--data-dir", data_dir, "--out", f"{tmp}/r", "--device", "cpu",
                                      "--no-tensorboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if case.startswith("late"):  # a neighbour that starts after the command's start-up reading
                time.sleep(late_s)
                spinner = spin()
            _, err = train.communicate()
            if train.returncode != 0:
                raise SystemExit(f"{case}: mnist train exited {train.returncode}: {err.decode()[-400:]}")
            return time.perf_counter() - t0
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of `mnist train` in every case")
    parser.add_argument("--late-s", type=float, default=3.0, help="late-* cases: seconds before the spinner starts")
    parser.add_argument("--cases", nargs="+", default=["alone-auto", "busy-auto", f"busy-{usable_cores()}", "busy-1"])
    args = parser.parse_args()
    cases = args.cases
    times: dict[str, list[float]] = {c: [] for c in cases}
    for rep in range(args.reps):
        for case in cases if rep % 2 == 0 else cases[::-1]:
            times[case].append(run(case, args.data_dir, args.epochs, args.late_s))
            print(json.dumps({"case": case, "seconds": round(times[case][-1], 2)}), flush=True)
    base = statistics.median(times[cases[0]])
    print(json.dumps({"benchmark": "contention", "cores": usable_cores(),
                      "median_seconds": {c: round(statistics.median(t), 2) for c, t in times.items()},
                      "ratio_to_alone": {c: round(statistics.median(t) / base, 2) for c, t in times.items()}}))


if __name__ == "__main__":
    main()
