"""Batch inference on the 10,000 test images: plain fp32 eager PyTorch against faster paths, in one run.

Every path must give the same predictions as the plain one (checked, and reported). Prints one JSON line
per path (images per second, best of ``--repeats``) and a summary line.

    .venv/bin/python benchmarks/inference_speed.py --checkpoint runs/default/model.pt
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mnist_classifier.models import checkpoint
from mnist_classifier.data import load_mnist
from mnist_classifier.evaluation import predict_logits
from mnist_classifier.inference.export import export_onnx
from mnist_classifier.data.images import normalize


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up (and compilation, for compiled paths)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to warm up)")
    args = parser.parse_args()
    torch.manual_seed(0)

    splits = load_mnist(args.data_dir)
    payload = checkpoint.load(args.checkpoint)
    info = checkpoint.dataset_info(payload)
    x = normalize(splits.test_images, info.mean, info.std)  # (10000, 1, 28, 28) float32, NCHW
    n = len(x)
    bs = args.batch_size

    plain = checkpoint.model_from_payload(payload)  # fp32, NCHW, eval mode

    def eager_plain():
        with torch.no_grad():
            return torch.cat([plain(x[i:i + bs]) for i in range(0, n, bs)]).argmax(1).numpy()

    cl_model = checkpoint.model_from_payload(payload).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def channels_last():
        return predict_logits(cl_model, x_cl, bs).argmax(1).numpy()

    def channels_last_bf16():
        return predict_logits(cl_model, x_cl, bs, torch.bfloat16).argmax(1).numpy()

    paths = {"eager_fp32": eager_plain, "channels_last_fp32": channels_last, "channels_last_bf16": channels_last_bf16}

    import onnxruntime as ort

    tmp = tempfile.TemporaryDirectory()
    onnx_path = export_onnx(payload, Path(tmp.name) / "m.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    for obs in (bs, n):
        paths[f"onnxruntime_fp32_batch{obs}"] = (
            lambda obs=obs: np.concatenate([session.run(None, {"images": xn[i:i + obs]})[0] for i in range(0, n, obs)]).argmax(1))
    if args.compile:
        compiled = torch.compile(cl_model)
        paths["compile_channels_last_fp32"] = lambda: predict_logits(compiled, x_cl, bs).argmax(1).numpy()

    base_time, base_pred = best_of(eager_plain, args.repeats)
    results = []
    for name, fn in paths.items():
        seconds, pred = (base_time, base_pred) if name == "eager_fp32" else best_of(fn, args.repeats)
        same = int((pred == base_pred).sum())
        line = {"path": name, "images_per_second": round(n / seconds), "speedup": round(base_time / seconds, 2),
                "identical_predictions": same == n, "agreeing": same, "batch_size": bs,
                "threads": torch.get_num_threads()}
        results.append(line)
        print(json.dumps(line), flush=True)
    best = max((r for r in results if r["identical_predictions"]), key=lambda r: r["images_per_second"])
    print(json.dumps({"benchmark": "inference_speed", "baseline_images_per_second": results[0]["images_per_second"],
                      "best_identical_path": best["path"], "best_images_per_second": best["images_per_second"],
                      "speedup": best["speedup"]}))


if __name__ == "__main__":
    main()
