"""What this CPU can do, and how much of it the guide recipe's training step uses (a roofline row).

Ceilings, measured with torch at the current thread count, fp32 (and bf16 where the CPU has it natively):
  - GEMM: a 2048 x 2048 x 2048 matrix product (2 * 2048^3 FLOP);
  - conv: the guide CNN's second convolution (16 -> 32 channels, 3x3, 14x14) on a batch of 64, forward only.
Achieved: the guide CNN's training step (forward + backward + Adam) on batches of 64, timed over --steps
steps after a warm-up. Its FLOP are counted by torch's FlopCounterMode (convolutions and matrix products,
forward and backward): 7.08 MFLOP per training image.

    .venv/bin/python benchmarks/roofline.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mnist_classifier.device import cpu_has_native_bf16
from mnist_classifier.models import ModelConfig, build_model


def timed(fn, reps: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def gemm(dtype: torch.dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    return 2 * 2048**3 / timed(lambda: a @ b, 10) / 1e9


def conv(dtype: torch.dtype) -> float:
    x = torch.randn(64, 16, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flop = 2 * 64 * 32 * 14 * 14 * 16 * 9  # batch x out channels x pixels x (in channels x 3 x 3) multiply-adds
    return flop / timed(lambda: F.conv2d(x, w, padding=1), 200) / 1e9


def train_step(steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="guide-cnn")).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (64,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / timed(step, steps) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    row = {"benchmark": "roofline", "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
           "gemm_fp32_gflops": round(gemm(torch.float32), 1), "conv_fp32_gflops": round(conv(torch.float32), 1)}
    if row["native_bf16"]:
        row["gemm_bf16_gflops"] = round(gemm(torch.bfloat16), 1)
        row["conv_bf16_gflops"] = round(conv(torch.bfloat16), 1)
    row["guide_train_step_gflops"] = round(train_step(args.steps), 1)
    row["guide_step_share_of_gemm"] = round(row["guide_train_step_gflops"] / row["gemm_fp32_gflops"], 3)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
