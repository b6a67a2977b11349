"""Issue 23's findings, measured on a live `mnist serve` (default flags: one worker per core): what a normal
client sees beside each kind of abuse, and what restarts and drains lose. Prints one JSON line per case.

    .venv/bin/python benchmarks/server_round3.py --checkpoint runs/<run>/model.pt
    PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/server_round3.py ...   (another version)

Abusers run in processes of their own (no GIL shared with the measuring client). Loopback only.
"""

import argparse
import collections
import io
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import attacks  # noqa: E402
from conftest import serving, sigterm_while_paused, while_paused, worker_pids  # noqa: E402
from mnist_classifier.serving.workers import MIGRATE_SYSCTL  # noqa: E402


def png(side: int, seed: int = 0) -> bytes:
    """A digit-like ``side`` x ``side`` grey PNG with some noise (so it does not compress to nothing)."""
    img = np.full((side, side), 255, np.uint8)
    img[side // 5:4 * side // 5, side // 2 - side // 10:side // 2 + side // 10] = 0
    img = np.clip(img.astype(int) + np.random.default_rng(seed).integers(-20, 20, img.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _abuse(base: str, kind: str, stop, side: int, statuses, ready) -> None:  # noqa: ANN001 - Event, Queues
    """One abusing client, looping until ``stop``; says it is ``ready`` once its files are made, and puts the
    statuses it got (a Counter) on ``statuses``."""
    body = attacks.png_iccp_chunks() if kind == "iccp" else None
    # batches as large as the 5 MB body limit allows: 64 of 28x28, 48 of 400x400 (78 KB each)
    files = [("file", (f"{i}.png", png(side, i), "image/png")) for i in range(64 if side < 100 else 48)]
    seen: collections.Counter = collections.Counter()
    ready.put(1)
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                if kind == "iccp":
                    r = client.post(f"{base}/predict", content=body, headers={"content-type": "image/png"})
                else:
                    r = client.post(f"{base}/predict/batch", files=files)
                seen[r.status_code] += 1
            except httpx.HTTPError as exc:
                seen[type(exc).__name__] += 1
    statuses.put(dict(seen))


def normal_client(base: str, seconds: float, side: int = 28) -> dict:
    """One image at a time for ``seconds`` (20 ms apart): p50, p99, max in ms, and requests over 5 s."""
    image, latencies, timeouts = png(side), [], 0
    end = time.monotonic() + seconds
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                client.post(f"{base}/predict", content=image, headers={"content-type": "image/png"})
                latencies.append((time.monotonic() - t0) * 1000)
            except httpx.TimeoutException:
                timeouts += 1
                latencies.append(5000.0)  # at least
            time.sleep(0.02)
    latencies.sort()
    at = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None  # noqa: E731
    return {"requests": len(latencies), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0),
            "timeouts_5s": timeouts}


def beside(checkpoint: Path, kind: str | None, clients: int, side: int, seconds: float) -> dict:
    """The normal client's latencies with ``clients`` abusers of ``kind`` running (None: alone)."""
    ctx = multiprocessing.get_context("spawn")
    with serving(checkpoint) as base:
        stop, statuses, ready = ctx.Event(), ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_abuse, args=(base, kind, stop, side, statuses, ready))
                 for _ in range(clients if kind else 0)]
        [p.start() for p in procs]
        for _ in procs:
            ready.get(timeout=300)
        time.sleep(2 if procs else 0)  # the abusers are looping
        seen = normal_client(base, seconds, side)
        stop.set()
        abusers = collections.Counter()
        for _ in procs:
            abusers.update(statuses.get(timeout=120))
        [p.join(60) for p in procs]
    return {**seen, "abusers_got": {str(k): v for k, v in abusers.items()}}


def slow_bodies(checkpoint: Path, count: int = 100, wait: float = 20) -> dict:
    """``count`` bodies sent at 1 byte/s: how many connections are still open after ``wait`` seconds."""
    with serving(checkpoint) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        socks = []
        for _ in range(count):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
            socks.append(s)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            for s in socks:
                try:
                    s.send(b"x")
                except OSError:
                    pass
            time.sleep(1)
        open_ = 0
        for s in socks:
            s.setblocking(False)
            try:
                s.recv(65536)  # an answer (408) or b"" (closed): the server let go of it
            except BlockingIOError:
                open_ += 1  # nothing to read and not closed: still held open
            except OSError:
                pass
            s.close()
    return {"bodies": count, "after_s": wait, "still_open": open_}


def drain(checkpoint: Path, uploads: int = 32) -> dict:
    """SIGTERM with ``uploads`` sent while the workers were paused: how many were answered."""
    proc = []
    with serving(checkpoint, "--workers", "2", process=proc) as base:
        results = sigterm_while_paused(base, proc[0], worker_pids(base, 2), [png(28)] * uploads)
        proc[0].wait(30)
    answered = sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    return {"uploads": uploads, "answered": answered, "errors": uploads - answered}


def kill_queued(checkpoint: Path, uploads: int = 32) -> dict:
    """SIGKILL one of two workers while it is paused with its share of ``uploads`` waiting in its socket's
    backlog: how many were answered, under the kernel's net.ipv4.tcp_migrate_req as it is set."""
    with serving(checkpoint, "--workers", "2", "--backend", "torch") as base:
        victim = worker_pids(base, 2)[0]
        results = while_paused(base, [victim], [png(28)] * uploads, lambda: os.kill(victim, signal.SIGKILL))
    answered = sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    return {"uploads": uploads, "answered": answered, "errors": uploads - answered,
            "tcp_migrate_req": MIGRATE_SYSCTL.read_text().strip() if MIGRATE_SYSCTL.exists() else None}


def kills(checkpoint: Path, count: int = 4) -> dict:
    """SIGKILL a ready worker ``count`` times, 5 s apart: is the server still up, and the worst latency of a
    client posting on new connections all along."""
    proc = []
    with serving(checkpoint, process=proc) as base:
        for _ in range(count):
            try:
                pids = {httpx.get(f"{base}/health", timeout=10).json()["worker_pid"] for _ in range(20)}
            except httpx.HTTPError:
                break  # nothing answers any more
            os.kill(min(pids), signal.SIGKILL)
            time.sleep(5)
        up = proc[0].poll() is None
        try:
            alive = httpx.get(f"{base}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            alive = False
    return {"kills": count, "supervisor_running": up, "answers_after": alive}


def big_header(checkpoint: Path) -> dict:
    with serving(checkpoint) as base:
        try:
            status = httpx.get(f"{base}/health", headers={"x-big": "b" * 20_000_000}, timeout=30).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
    return {"header_bytes": 20_000_000, "status": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--cases", nargs="+", default=["alone", "iccp", "batch28", "batch400", "slow", "drain",
                                                        "kills", "header"])
    args = parser.parse_args()
    cases = {
        "alone": lambda: beside(args.checkpoint, None, 0, 28, args.seconds),
        "alone400": lambda: beside(args.checkpoint, None, 0, 400, args.seconds),
        "iccp": lambda: beside(args.checkpoint, "iccp", 2, 28, args.seconds),
        "batch28": lambda: beside(args.checkpoint, "batch", 8, 28, args.seconds),
        "batch400": lambda: beside(args.checkpoint, "batch", 8, 400, args.seconds),
        "slow": lambda: slow_bodies(args.checkpoint),
        "drain": lambda: drain(args.checkpoint),
        "kills": lambda: kills(args.checkpoint),
        "kill-queued": lambda: kill_queued(args.checkpoint),
        "header": lambda: big_header(args.checkpoint),
    }
    for name in args.cases:
        print(json.dumps({"case": name, **cases[name]()}), flush=True)


if __name__ == "__main__":
    main()
