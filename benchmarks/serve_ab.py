"""Peak throughput of two versions of `mnist serve`, side by side: wrk (HTTP/1.1 keep-alive) posting one image
to /predict, the versions alternated round by round so that the VM's drift hits both. Needs `wrk`.

    .venv/bin/python benchmarks/serve_ab.py --checkpoint model.pt --old /path/to/old/src [--rounds 3] [--side 28]

Prints one JSON line per run and a summary with the medians and the new/old ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import serving  # noqa: E402
from server_round3 import png  # noqa: E402


def run_wrk(base: str, body: Path, seconds: int, connections: int) -> dict:
    env = {**os.environ, "BODY": str(body), "CTYPE": "image/png"}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
                          "-s", str(HERE / "serve_peers" / "wrk.lua"), f"{base}/predict"],
                         env=env, capture_output=True, text=True, check=True).stdout
    j = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])
    return {"rps": round(j["requests"] / (j["duration_us"] / 1e6), 1), "p50_ms": j["p50_us"] / 1000,
            "p99_ms": j["p99_us"] / 1000, "non_2xx": j["status"], "errors": j["connect"] + j["read"] + j["timeout"]}


def all_ready(base: str, timeout: float = 60) -> None:
    """Until every worker listens (where /readyz counts them), then 2 s more for either version: wrk's
    keep-alive connections, opened while one worker was still loading, would all stay on the other."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = httpx.get(f"{base}/readyz").json()
        if ready.get("workers_ready", 0) >= ready.get("workers", 0):
            break
        time.sleep(0.1)
    time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--old", required=True, help="the other version's src folder (PYTHONPATH)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--side", type=int, default=28)
    args = parser.parse_args()
    body = Path(tempfile.mkdtemp()) / "image.png"
    body.write_bytes(png(args.side))
    rps: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.rounds):
        for version in ("old", "new") if i % 2 == 0 else ("new", "old"):
            saved = os.environ.get("PYTHONPATH")
            if version == "old":
                os.environ["PYTHONPATH"] = args.old
            try:
                with serving(args.checkpoint) as base:
                    all_ready(base)
                    seen = run_wrk(base, body, args.seconds, args.connections)
            finally:
                os.environ.pop("PYTHONPATH", None)
                if saved is not None:
                    os.environ["PYTHONPATH"] = saved
            rps[version].append(seen["rps"])
            print(json.dumps({"version": version, "round": i, "side": args.side, **seen}), flush=True)
    old, new = statistics.median(rps["old"]), statistics.median(rps["new"])
    print(json.dumps({"median_rps_old": old, "median_rps_new": new, "new_over_old": round(new / old, 3)}))


if __name__ == "__main__":
    main()
