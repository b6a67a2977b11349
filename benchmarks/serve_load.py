"""Load on `mnist serve` over loopback: N image uploads at concurrency C; prints latency and throughput.

Starts the server itself on a free port, sends 28x28-digit PNGs rendered at 84x84 (so each request does the
full preprocessing), and prints one JSON line, with the forward-pass batch sizes the server's /metrics saw and
every status it answered (no 5xx allowed).

    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/<run>/model.pt [--requests 1000] [--concurrency 16]
        [--serve-args "--workers 1 --backend torch"]
"""

import argparse
import io
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import free_port
from PIL import Image


KEEPALIVE_EXPIRY_S = 1.0  # the client's; under the server's --keep-alive

# (label, httpx.post keyword arguments): each must get a 4xx
MALFORMED = [
    ("not an image", {"files": {"file": ("x.png", b"hello", "image/png")}}),
    ("empty upload", {"files": {"file": ("x.png", b"", "image/png")}}),
    ("bad json", {"content": b"{oops", "headers": {"content-type": "application/json"}}),
    ("wrong shape", {"json": {"pixels": [[1, 2], [3, 4]]}}),
    ("wrong type", {"content": b"abc", "headers": {"content-type": "text/csv"}}),
    ("too big", {"content": b"\0" * 6_000_000, "headers": {"content-type": "image/png"}}),
    ("no file field", {"files": {"other": ("x.png", b"abc", "image/png")}}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--serve-args", default="", help="extra `mnist serve` flags, one string")
    parser.add_argument("--malformed-concurrency", type=int, default=0,
                        help="also run a second client sending malformed requests at this concurrency meanwhile")
    args = parser.parse_args()

    from mnist_classifier.data import load_mnist

    splits = load_mnist(args.data_dir)
    bodies = []
    for i in range(100):
        buf = io.BytesIO()
        Image.fromarray(255 - splits.test_images[i, 0].numpy()).resize((84, 84)).save(buf, format="PNG")
        bodies.append(buf.getvalue())

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "serve", "--checkpoint", args.checkpoint,
                               "--port", str(port), *shlex.split(args.serve_args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        latencies, codes = [], []
        # Idle connections are dropped after 1 s, well before the server closes them (--keep-alive, 5 s): at equal
        # expiries (httpx's default is also 5 s) a request sent as the server closes its connection fails with
        # RemoteProtocolError, which a loaded 2-core machine sees now and then.
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S)
        with httpx.Client(timeout=30, limits=limits) as client:
            def one(i: int) -> None:
                t0 = time.perf_counter()
                try:
                    upload = {"file": ("d.png", bodies[i % len(bodies)], "image/png")}
                    code = client.post(f"{base}/predict", files=upload).status_code
                except httpx.HTTPError as exc:  # counted and named, so that one failure cannot end (or hang) the run
                    code = type(exc).__name__
                latencies.append(time.perf_counter() - t0)
                codes.append(code)

            for i in range(20):  # warm-up
                one(i)
            latencies.clear()
            codes.clear()
            bad_codes: list[int] = []
            done = threading.Event()

            def malformed_client() -> None:
                with httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)) as bad:
                    i = 0
                    while not done.is_set():
                        kind, kwargs = MALFORMED[i % len(MALFORMED)]
                        try:
                            bad_codes.append(bad.post(f"{base}/predict", **kwargs).status_code)
                        except httpx.HTTPError:
                            bad_codes.append(-1)
                        i += 1

            bad_threads = [threading.Thread(target=malformed_client, daemon=True)
                           for _ in range(args.malformed_concurrency)]
            for t in bad_threads:
                t.start()
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                with ThreadPoolExecutor(args.concurrency) as pool:
                    list(pool.map(one, range(args.requests)))
                wall, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            finally:  # the malformed clients stop however the run ends
                done.set()
                for t in bad_threads:
                    t.join(timeout=60)
        served = server_metrics(base)
    finally:
        server.terminate()
        server.wait(timeout=10)
    q = statistics.quantiles(latencies, n=100)
    print(json.dumps({
        "benchmark": "serve_load", "requests": args.requests, "concurrency": args.concurrency,
        "errors": sum(c != 200 for c in codes), "error_kinds": dict(Counter(str(c) for c in codes if c != 200)),
        "throughput_rps": round(args.requests / wall, 1),
        "p50_ms": round(1000 * q[49], 2), "p99_ms": round(1000 * q[98], 2),
        "client_cores": round(client_cpu / wall, 2),  # this Python client's own share of the machine
        "malformed_sent": len(bad_codes), "malformed_not_4xx": sum(not 400 <= c < 500 for c in bad_codes),
        **served,
    }))


def server_metrics(base: str) -> dict:
    """What the server's /metrics says: batch sizes (mean and histogram) and its answers by status."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text) for s in f.samples]
    value = {s.name: s.value for s in samples if not s.labels}
    buckets = {s.labels["le"]: s.value for s in samples if s.name == "mnist_batch_size_bucket"}
    counts, prev = {}, 0.0
    for le, cumulative in buckets.items():  # cumulative counts -> passes per bucket
        if cumulative > prev:
            counts[f"<={le}"] = int(cumulative - prev)
        prev = cumulative
    statuses: dict[str, int] = {}
    for s in samples:
        if s.name == "mnist_requests_total":
            statuses[s.labels["status"]] = statuses.get(s.labels["status"], 0) + int(s.value)
    return {"forward_passes": int(value["mnist_batch_size_count"]),
            "mean_batch": round(value["mnist_batch_size_sum"] / max(1, value["mnist_batch_size_count"]), 2),
            "batch_histogram": counts, "server_statuses": statuses}


if __name__ == "__main__":
    main()
