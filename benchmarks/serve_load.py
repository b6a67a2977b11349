"""Load on `mnist serve` over loopback: N image uploads at concurrency C; prints latency and throughput.

Starts the server itself on a free port, sends 28x28-digit PNGs rendered at 84x84 (so each request does the
full preprocessing), and prints one JSON line.

    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/<run>/model.pt [--requests 1000] [--concurrency 16]
"""

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--data-dir", default="data")
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
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        latencies, codes = [], []
        with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=args.concurrency)) as client:
            def one(i: int) -> None:
                t0 = time.perf_counter()
                r = client.post(f"{base}/predict", files={"file": ("d.png", bodies[i % len(bodies)], "image/png")})
                latencies.append(time.perf_counter() - t0)
                codes.append(r.status_code)

            for i in range(20):  # warm-up
                one(i)
            latencies.clear()
            codes.clear()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)
    q = statistics.quantiles(latencies, n=100)
    print(json.dumps({
        "benchmark": "serve_load", "requests": args.requests, "concurrency": args.concurrency,
        "errors": sum(c != 200 for c in codes), "throughput_rps": round(args.requests / wall, 1),
        "p50_ms": round(1000 * q[49], 2), "p99_ms": round(1000 * q[98], 2),
    }))


if __name__ == "__main__":
    main()
