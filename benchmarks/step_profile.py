"""Where the guide recipe's training step spends its time on this CPU, and one alternative for its costliest
non-convolution part (issue 24).

Part 1 profiles the step as `mnist train` runs it (channels_last, fused Adam, flush-to-zero, the precision
`--precision auto` picks here) on the real MNIST training images, batch 64, and prints torch.profiler's ops by
their own CPU time, in ms per step, with the page faults per step outside and inside the profiler: under
the profiler the step takes fresh pages (~450 per step on a Zen 4 VM in bf16, against 0 without it), and
the zero-fill of the first pooling's gradient is charged ~40x what it takes alone. Part 2 times, outside the profiler, the 2 x 2 max-pooling (forward and backward) at the guide
CNN's two shapes against the same pooling written as a reshape and ``amax``, which needs no index scatter
and no zero-filled gradient buffer (the two give different gradients where a window holds tied maxima), and
the zero-fill alone, and against the same pooling as elementwise ops on the input's four strided quarters with
max_pool2d's own gradient (``ElementwisePool``; its ``elementwise_exact`` says whether output and gradient
equal max_pool2d's on an input with many tied maxima), and against the package's kernel (models/pooling.py,
``package_kernel``); then max_pool2d's and the kernel's forward alone, without autograd (``*_forward_us``; the
forward and backward above include adding each gradient into x's). Part 3 times the guide CNN's first layer as
torch's layers and as the package's fused kernel.

    .venv/bin/python benchmarks/step_profile.py
    .venv/bin/python benchmarks/step_profile.py --model fast-cnn-centre --batch-size 256 --lr 0.02

With --model, part 1 profiles that network's step instead (the fast recipe's, above) and part 2 is skipped.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mnist_classifier.data import load_dataset
from mnist_classifier.device import cpu_has_native_bf16
from mnist_classifier.models import ModelConfig, build_model
from mnist_classifier.models.pooling import max_pool2x2
from mnist_classifier.training.step import Bf16WeightsStep
from step_variants import MEAN, STD, make_variant  # the same step as the one-change table's "kept" variant


def profile_step(images: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None, steps: int,
                 settings: SimpleNamespace) -> dict:
    """``steps`` of ``settings.batch_size`` through ``settings.model``, timed and then profiled; the step is
    step_variants' "kept" (fp32) or, in bf16, the step `mnist train` runs: "bf16-weights" for a model without
    buffers (since 2026-12-05; "bf16-autocast" before), "bf16-autocast" for one with batch norm. With the
    epoch loop's loss sums. ``conv_share`` is the convolutions' share (forward and backward) of all ops' own
    CPU time; ``conv_forward_gflops`` the rate of each convolution's forward pass."""
    twin = Bf16WeightsStep.eligible(build_model(ModelConfig(name=settings.model)))
    variant = ("bf16-weights" if twin else "bf16-autocast") if amp else "kept"
    step = make_variant(variant, settings, images, labels).step
    b = settings.batch_size
    batches = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[: b * (steps + 20)]
    for idx in batches[: b * 20].view(20, b):  # warm-up: oneDNN primitives, allocator
        step(idx)
    timed = batches[b * 20:].view(steps, b)
    t0, faults = time.perf_counter(), page_faults()
    for idx in timed:
        step(idx)
    ms_per_step, faults = (time.perf_counter() - t0) / steps * 1000, (page_faults() - faults) / steps
    faults_profiled = page_faults()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for idx in timed:
            step(idx)
    faults_profiled = (page_faults() - faults_profiled) / steps
    every = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)
    ops = sorted(every, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    conv = sum(e.self_cpu_time_total for e in every if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward"))
    return {"model": settings.model, "batch_size": b, "step": variant, "ms_per_step": round(ms_per_step, 2),
            "conv_share": round(conv / sum(e.self_cpu_time_total for e in every), 3),
            "page_faults_per_step": round(faults, 1), "page_faults_per_step_profiled": round(faults_profiled, 1),
            "self_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 3) for e in ops},
            "conv_forward_gflops": conv_forward_rates(by_shape)}


def conv_forward_rates(by_shape) -> dict:  # noqa: ANN001 - the profiler's grouped averages
    """GFLOP/s of each convolution's forward pass (3 x 3, stride 1, padding 1: H and W kept), keyed
    ``"C_in->C_out at HxW"``: 2 * B * H * W * C_out * C_in * k * k FLOP per call, over its own CPU time."""
    rates = {}
    for e in by_shape:
        if e.key != "aten::mkldnn_convolution" or not e.count:
            continue
        (b, c_in, h, w), (c_out, _, kh, kw) = e.input_shapes[0], e.input_shapes[1]
        flop = 2 * b * h * w * c_out * c_in * kh * kw
        rates[f"{c_in}->{c_out} at {h}x{w}"] = round(flop * e.count / (e.self_cpu_time_total * 1e-6) / 1e9)
    return rates


def page_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the kernel had to map and zero."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_fill(dtype: torch.dtype, shape: tuple[int, ...], reps: int) -> dict:
    """Zero-filling a buffer of the first pooling's input shape, as its backward does, outside the profiler."""
    buf = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    for _ in range(10):
        buf.zero_()
    t0 = time.perf_counter()
    for _ in range(reps):
        buf.zero_()
    return {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
            "zero_fill_us": round((time.perf_counter() - t0) / reps * 1e6, 1)}


def amax_pool(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.unflatten(2, (h // 2, 2)).unflatten(4, (w // 2, 2)).amax((3, 5))


class ElementwisePool(torch.autograd.Function):
    """2 x 2 max-pooling of a channels_last (B, C, H, W) tensor as elementwise ops on its four strided quarters,
    with max_pool2d's own gradient: at tied maxima, all of it to the first in the window (row by row).

    Forward: two maxima of pairs and one of the pairs' maxima, each with a ``>`` mask of who won (ties keep
    the first). Backward: the masks route the gradient into the four quarters of a fresh buffer; no zero-fill
    and no index scatter. Tried for issue 24 (2026-12-05, a ninth session): exact, but slower."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's context
        b, c, h, w = x.shape
        q = x.permute(0, 2, 3, 1).view(b, h // 2, 2, w // 2, 2, c)  # channels_last memory is (B, H, W, C)
        top, bottom = (q[:, :, 0, :, 0], q[:, :, 0, :, 1]), (q[:, :, 1, :, 0], q[:, :, 1, :, 1])
        right_won, bottom_right_won = top[1] > top[0], bottom[1] > bottom[0]
        upper, lower = torch.maximum(*top), torch.maximum(*bottom)  # (B, H/2, W/2, C)
        lower_won = lower > upper
        ctx.save_for_backward(right_won, bottom_right_won, lower_won)
        return torch.maximum(upper, lower).permute(0, 3, 1, 2)  # (B, C, H/2, W/2), channels_last

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        right_won, bottom_right_won, lower_won = ctx.saved_tensors
        g = grad.permute(0, 2, 3, 1)  # (B, H/2, W/2, C)
        b, h2, w2, c = g.shape
        out = torch.empty((b, h2 * 2, w2 * 2, c), dtype=g.dtype)
        q = out.view(b, h2, 2, w2, 2, c)
        zero = torch.zeros((), dtype=g.dtype)
        upper = torch.where(lower_won, zero, g)
        lower = g - upper
        for row, (won, part) in enumerate(((right_won, upper), (bottom_right_won, lower))):
            torch.where(won, zero, part, out=q[:, :, row, :, 0])
            torch.where(won, part, zero, out=q[:, :, row, :, 1])
        return out.permute(0, 3, 1, 2)


def same_as_max_pool2d(dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """ElementwisePool's output and gradient equal max_pool2d's, on whole numbers (many tied maxima)."""
    x = torch.randn(shape).round().to(dtype).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(a, 2), ElementwisePool.apply(b)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    return torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def time_pooling(dtype: torch.dtype, shape: tuple[int, ...], reps: int) -> dict:
    x0 = torch.randn(shape).relu().to(dtype).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    result = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
              "elementwise_exact": same_as_max_pool2d(dtype, shape)}
    for name, pool in (("max_pool2d", lambda t: F.max_pool2d(t, 2)), ("reshape_amax", amax_pool),
                       ("elementwise", ElementwisePool.apply), ("package_kernel", max_pool2x2)):
        x = x0.clone().requires_grad_()
        for _ in range(10):
            pool(x).sum().backward()
        t0 = time.perf_counter()
        for _ in range(reps):
            y = pool(x)
            y.backward(torch.ones_like(y))
        result[f"{name}_us"] = round((time.perf_counter() - t0) / reps * 1e6)
    with torch.no_grad():  # the forward alone, as evaluation runs it: no gradient accumulated into x
        for name, pool in (("max_pool2d", lambda t: F.max_pool2d(t, 2)), ("package_kernel", max_pool2x2)):
            for _ in range(10):
                pool(x0)
            t0 = time.perf_counter()
            for _ in range(reps):
                pool(x0)
            result[f"{name}_forward_us"] = round((time.perf_counter() - t0) / reps * 1e6)
    return result


def time_first_layer(dtype: torch.dtype, images: torch.Tensor, reps: int) -> dict:
    """The guide CNN's first layer (conv1, pool, ReLU) forward and backward on 64 real images, as torch's layers
    and as the package's fused kernel (``MaxPool2x2.after_conv``)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="guide-cnn")).to(dtype=dtype, memory_format=torch.channels_last)
    x = images[:64].to(dtype).contiguous(memory_format=torch.channels_last)  # (64, 1, 28, 28)
    grad = torch.ones(64, 16, 14, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
    result = {"dtype": str(dtype).removeprefix("torch."), "layer": "conv1 1->16 3x3 + pool + ReLU, batch 64"}
    for name, native_ok in (("torch_layers", False), ("fused_kernel", True)):
        model.pool.native = native_ok
        for rep in range(10 + reps):
            if rep == 10:
                t0 = time.perf_counter()
            model.pool.after_conv(model.conv1, x, relu=True).backward(grad)
        result[f"{name}_us"] = round((time.perf_counter() - t0) / reps * 1e6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--model", default="guide-cnn", help="e.g. fast-cnn-centre (then --batch-size 256 --lr 0.02)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.001)
    args = parser.parse_args()
    settings = SimpleNamespace(model=args.model, lr=args.lr, batch_size=args.batch_size)
    torch.set_flush_denormal(True)
    splits = load_dataset("mnist", args.data_dir)
    images = (splits.train_images.float() / 255 - MEAN) / STD  # (60000, 1, 28, 28)
    for amp in ([torch.bfloat16] if cpu_has_native_bf16() else []) + [None]:
        print(json.dumps(profile_step(images, splits.train_labels, amp, args.steps, settings)))
    if args.model != "guide-cnn":
        return  # part 2 times the guide CNN's shapes
    for dtype in ([torch.bfloat16] if cpu_has_native_bf16() else []) + [torch.float32]:
        for shape in ((64, 16, 28, 28), (64, 32, 14, 14)):  # the outputs of the guide CNN's two convolutions
            print(json.dumps(time_pooling(dtype, shape, args.reps)))
        print(json.dumps(time_fill(dtype, (64, 16, 28, 28), args.reps)))
        print(json.dumps(time_first_layer(dtype, images, args.reps)))


if __name__ == "__main__":
    main()
