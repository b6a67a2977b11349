"""`mnist serve` while 12 clients upload decode bombs in a loop: /health latency, the server's peak memory (all
its processes together), the statuses the bombs got, and how long the server takes to stop after SIGTERM with
uploads in flight.
Loopback only; runs for --seconds and stops by itself.

    .venv/bin/python benchmarks/server_under_attack.py --checkpoint runs/<run>/model.pt [--seconds 15]
    PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/server_under_attack.py ...   (another version)
"""

import argparse
import collections
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import attacks  # noqa: E402
from conftest import serving  # noqa: E402


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the supervisor and its worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def memory_mb(pid: int, field: str) -> float:
    """``field`` (VmRSS: now, VmHWM: the peak) summed over the server's processes, in MB."""
    total = 0
    for p in tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += int(next((line for line in status.splitlines() if line.startswith(f"{field}:")), f"{field}: 0").split()[1])
    return total / 1024


def attack(checkpoint: Path, seconds: float = 15, clients: int = 12) -> dict:
    """Serve ``checkpoint``, have ``clients`` threads upload bombs for ``seconds`` while /health is polled,
    then SIGTERM the server with uploads in flight. Returns what was seen (None: not stopped within 120 s).

    A request that got no answer is listed in ``dropped_ms`` by when it was sent, in ms relative to SIGTERM:
    uvicorn drains the requests it has started on and closes idle keep-alive connections at once, so a request
    still in transit at that moment (or sent after it) is dropped; one sent well before it should never be.
    Requests still running when the drain's time runs out get 503; ``503_before_sigterm`` counts any other."""
    bombs = {"jpeg-3000-scans": attacks.progressive_jpeg_many_scans(3900), "rle8-bmp": attacks.rle8_bmp(3900),
             "png-4000x4000": attacks.huge_png(4000), "ico-big-png": attacks.ico_with_big_png(13300),
             "png-6320x6320": attacks.huge_png(6320)}
    process: list = []
    with serving(checkpoint, process=process) as base:
        proc = process[0]
        idle_mb = memory_mb(proc.pid, "VmRSS")
        stop, statuses, health, dropped, term_at = threading.Event(), collections.Counter(), [], [], []
        early_503 = [0]

        def attacker(i: int) -> None:
            names = list(bombs)
            with httpx.Client(timeout=300) as client:
                while not stop.is_set():
                    name = names[i % len(names)]
                    sent = time.monotonic()
                    try:
                        r = client.post(f"{base}/predict", files={"file": (name, bombs[name], "image/png")})
                        statuses[f"{name} {r.status_code}"] += 1
                        early_503[0] += r.status_code == 503 and not term_at  # busy, not shutting down
                    except httpx.ConnectError:
                        return  # the server has stopped listening
                    except httpx.HTTPError:  # no answer: when was it sent, relative to SIGTERM?
                        dropped.append(round(1000 * (sent - term_at[0]), 1) if term_at else float("-inf"))
                    i += 1

        threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                ok = httpx.get(f"{base}/health", timeout=30).status_code == 200
                health.append(time.monotonic() - t0 if ok else float("inf"))
            except httpx.HTTPError:
                health.append(float("inf"))
            time.sleep(0.2)
        peak = memory_mb(proc.pid, "VmHWM")  # each process's own peak, summed: at least the real peak
        t_term = time.monotonic()
        term_at.append(t_term)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
            stopped = round(time.monotonic() - t_term, 2)
        except subprocess.TimeoutExpired:  # still running two minutes after SIGTERM
            proc.kill()
            stopped = None
        stop.set()
    return {"clients": clients, "seconds": seconds, "requests": sum(statuses.values()), "statuses": dict(statuses),
            "dropped_ms": sorted(dropped), "503_before_sigterm": early_503[0],
            "health_median_ms": round(1000 * statistics.median(health), 1), "health_max_ms": round(1000 * max(health), 1),
            "server_idle_mb": round(idle_mb), "server_peak_mb": round(peak), "stop_after_sigterm_s": stopped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    print(json.dumps(attack(Path(args.checkpoint), args.seconds, args.clients)))


if __name__ == "__main__":
    main()
