"""The training step, one change at a time: what each CPU speed-up buys on this machine.

Every variant trains its own copy of the same network (same initial weights) on the real MNIST training
images through the project's ``TrainStep``, with one setting changed from what `mnist train` does today
("kept": channels_last, fused Adam, flush-to-zero, oneDNN on, eager fp32, the package's CPU kernels, and for
the guide CNN in fp32 its training pass without autograd, training/guide_pass.py). The
variants run in alternating chunks of --chunk steps for --rounds rounds, so machine noise hits all of them;
each variant's figure is the median over rounds of its ms per step, and its ratio is kept's median divided by
its own (> 1: faster).

    .venv/bin/python benchmarks/step_variants.py --model guide-cnn --batch-size 64
    .venv/bin/python benchmarks/step_variants.py --model fast-cnn --batch-size 256 --lr 0.02
    .venv/bin/python benchmarks/step_variants.py --variants kept kept+before --before /tmp/before

--keep-freed-memory first tells glibc (mallopt) to serve blocks up to 32 MB from its heap and keep up to 1 GB
of freed memory instead of returning it to the kernel (tried for issue 24, not adopted); it holds for the whole process, so compare it across processes (--variants kept, alternating runs with and without it). Each
line also reports the page faults per step (getrusage).

Variants:
  nchw            contiguous (NCHW) tensors instead of channels_last
  adam-foreach    Adam's multi-tensor (foreach) kernels instead of the fused one
  adam-for-loop   Adam's per-tensor Python loop
  no-ftz          subnormal floats computed, not flushed to zero
  no-onednn       oneDNN off (torch's own convolution kernels)
  onednn-bf16     oneDNN may compute fp32 convolutions and matrix products in bf16 (native-bf16 CPUs only)
  bf16-autocast   bf16 autocast, as `--precision bf16` (native-bf16 CPUs only)
  bare            the step alone, without the epoch loop's per-step loss sums (Python-side work); -bf16: under
                  bf16 autocast
  bf16-weights    bf16 without autocast (``Bf16WeightsStep``, what `mnist train` runs in bf16 for a model
                  without buffers): a bf16 copy of the model computes, two foreach copies per step move the
                  gradients to the fp32 weights and the stepped weights back; autocast's roundings, fewer
                  calls (native-bf16 CPUs only)
  V+no-native     variant V on torch's layers instead of the package's kernels (models/pooling.py: the 2x2
                  pool + ReLU, and the first convolution fused with them), which every other variant runs
                  where they apply: kept+no-native, bf16-weights+no-native, ...
  V+wide-kernel   variant V with the wider layer's bf16 backward on the package's kernel on an AMX CPU too,
                  where `mnist train` leaves it to oneDNN (AMX CPUs only: bf16-weights+wide-kernel)
  V+wide-onednn   the other way: the wider layer's bf16 backward left to oneDNN on any CPU (run it held below
                  AMX, ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, to see why the kernel stays without AMX)
  V+no-wide       variant V with the wider layer's backward left to torch (oneDNN) in any dtype, the pool's
                  kernel kept (kept+no-wide: what the kernel buys the guide's second layer in fp32)
  V+no-fused      variant V with the first layer's convolution and pool as torch's layers (oneDNN, then the
                  pool's kernel), not one kernel: kept+no-fused, bf16-weights+no-fused, bf16-autocast+no-fused
  V+plain-flatten variant V with the head's flatten as nn.Flatten's, whose gradient comes back in (C, H, W)
                  order, not channels_last (models/layout.py): the last ReLU's backward then takes torch's
                  slow path for two layouts (fast models, bn-cnn, m5-cnn; the guide CNN flattens itself)
  V+torch-unshuffle variant V with the fast models' pixel unshuffle as torch's operator (models/layout.py
                  runs it as a reshape, a permute and one copy on a CPU)
  V+torch-bn      variant V with the fast models' batch norm and ReLU as torch's layers in training
                  (models/batchnorm.py runs them as one kernel on CPU tensors in fp32 and bf16)
  V+autograd      variant V through autograd where `mnist train` trains the guide CNN in fp32 through its pass
                  without autograd (training/guide_pass.py): kept+autograd
  V+torch-step    variant V with Adam's update through ``Adam.step`` where `mnist train` calls torch's functional
                  ``adam`` on the same tensors without the wrapper (training/adam_update.py): kept+torch-step
  V+before        variant V on another checkout's kernels (--before PATH: its models/*.cpp and headers, built
                  by native.py under their own names), so a kernel change is measured on the whole step in one
                  process: --variants kept kept+before --before /tmp/before (after `git worktree add`)
  compile         torch.compile of the model (inductor fuses conv + bias + ReLU); compile seconds reported
  one-thread      the kept step at one torch thread (-bf16: under bf16 autocast), to see what the second
                  thread buys in this process
  split-threads   each batch halved, the halves' forward and backward on two Python threads at one torch
                  thread each (inter-op instead of intra-op parallelism), their gradients averaged; with
                  -bf16 under bf16 autocast (native-bf16 CPUs only)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch

from mnist_classifier.data import load_dataset
from mnist_classifier.device import cpu_has_amx_bf16, cpu_has_native_bf16
from mnist_classifier.models import ModelConfig, batchnorm, build_model, layout, pooling
from mnist_classifier.models.pooling import MaxPool2x2
from mnist_classifier.training.step import Bf16WeightsStep, TrainStep

MEAN, STD = 0.1307, 0.3081  # MNIST's training-set mean and std, as `mnist train` normalises


@dataclass
class Variant:
    name: str
    step: Callable[[torch.Tensor], None]
    context: Callable[[], contextlib.AbstractContextManager]
    setup_seconds: float = 0.0


@contextlib.contextmanager
def settings(ftz: bool = True, onednn: bool = True, onednn_fp32: str = "none") -> Iterator[None]:
    torch.set_flush_denormal(ftz)
    conv, mm = torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul
    old = conv.fp32_precision, mm.fp32_precision
    conv.fp32_precision = mm.fp32_precision = onednn_fp32
    try:
        with torch.backends.mkldnn.flags(enabled=onednn):
            yield
    finally:
        conv.fp32_precision, mm.fp32_precision = old
        torch.set_flush_denormal(True)


def keep_freed_memory() -> bool:
    """glibc: blocks up to 32 MB from the heap (M_MMAP_THRESHOLD, -3), 1 GB of free heap kept (M_TRIM_THRESHOLD, -1)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))


THREADS = {"split-threads": "1 in each of 2 Python threads", "one-thread": 1}  # variants not at the default
SUFFIXES = ("+no-native", "+wide-kernel", "+wide-onednn", "+no-wide", "+no-fused", "+plain-flatten",
            "+torch-unshuffle", "+torch-bn", "+autograd", "+torch-step")  # a change made to any variant


def base_of(name: str) -> str:
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def patched(attribute: str, value: Callable | Path, inner: Callable[[], contextlib.AbstractContextManager],
            module: ModuleType = pooling) -> Callable[[], Iterator[None]]:
    """``inner``'s settings, with ``module.<attribute>`` (``pooling``'s by default) replaced by ``value``:
    ``cpu_has_amx_bf16`` (whether the wider layer's bf16 backward is oneDNN's), a predicate always saying no
    (``wide_conv_applies``: the wider layer's backward kernel; ``fused_conv_applies``: the fused first layer;
    ``layout.grad_in_channels_last``: the head's flatten), or a kernel's source (``SOURCE``, ``CONV_SOURCE``:
    another checkout's)."""
    @contextlib.contextmanager
    def both() -> Iterator[None]:
        saved = getattr(module, attribute)
        setattr(module, attribute, value)
        try:
            with inner():
                yield
        finally:
            setattr(module, attribute, saved)
    return both


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The one-thread and split variants' setting: torch computes on one thread per Python thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with settings():
            yield
    finally:
        torch.set_num_threads(before)


def split_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               amp: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One optimizer step whose batch is halved: the second half's forward and backward run on a worker
    thread while the calling thread does the first. The mean of the halves' mean-loss gradients is the whole
    batch's gradient, summed in another order."""
    params = list(model.parameters())
    worker = ThreadPoolExecutor(1)

    def half(idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):  # autocast is per thread
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        return torch.autograd.grad(loss, params), loss.detach()

    def step(idx: torch.Tensor) -> torch.Tensor:
        other = worker.submit(half, idx[len(idx) // 2:])
        grads, loss = half(idx[: len(idx) // 2])
        grads_b, loss_b = other.result()
        for p, g, g_b in zip(params, grads, grads_b):
            p.grad = g.add_(g_b).mul_(0.5)
        optimizer.step()
        return (loss + loss_b) * 0.5

    return step


def make_variant(full_name: str, args, images: torch.Tensor, labels: torch.Tensor) -> Variant:
    name = full_name.removesuffix("+before")  # the variant itself; +before only moves the kernels' sources
    base = base_of(name)  # the variant it changes: on torch's layers, or with the wider layer's bf16 backward moved
    fmt = torch.contiguous_format if base == "nchw" else torch.channels_last
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model)).to(memory_format=fmt).train()
    for module in model.modules():
        if isinstance(module, MaxPool2x2):
            module.native = not name.endswith("+no-native")
    adam = {"adam-foreach": {"foreach": True}, "adam-for-loop": {"foreach": False}}.get(base, {"fused": True})
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, **adam)
    net = torch.compile(model) if base == "compile" else model
    x = images.contiguous(memory_format=fmt)
    amp = torch.bfloat16 if base in ("bf16-autocast", "split-threads-bf16", "one-thread-bf16", "bare-bf16") else None
    if base.startswith("split-threads"):
        train = split_step(net, optimizer, x, labels, amp)
    elif base == "bf16-weights":
        train = Bf16WeightsStep(net, optimizer, x, labels)
    else:
        train = TrainStep(net, optimizer, x, labels, amp_dtype=amp)
        if name.endswith("+autograd"):
            train.guide_pass = None
    if name.endswith("+torch-step"):
        train.adam_update = None
    sums = [torch.zeros(()), torch.zeros(())]

    def step(idx: torch.Tensor) -> None:
        loss = train(idx)
        if not base.startswith("bare"):  # what EpochLoop.run adds per step: the running and the epoch's loss sums
            sums[0] += loss
            sums[1] += loss * len(idx)

    ctx = {"no-ftz": lambda: settings(ftz=False), "no-onednn": lambda: settings(onednn=False),
           "onednn-bf16": lambda: settings(onednn_fp32="bf16")}.get(base, settings)
    if base.removesuffix("-bf16") in THREADS:  # the variants that run at one torch thread per Python thread
        ctx = one_torch_thread
    if name.endswith(("+wide-kernel", "+wide-onednn")):
        amx = name.endswith("+wide-onednn")
        ctx = patched("cpu_has_amx_bf16", lambda: amx, ctx)
    if name.endswith(("+no-wide", "+no-fused")):
        ctx = patched("wide_conv_applies" if name.endswith("+no-wide") else "fused_conv_applies",
                      lambda *args: False, ctx)
    if name.endswith("+plain-flatten"):
        ctx = patched("grad_in_channels_last", lambda x: False, ctx, module=layout)
    if name.endswith("+torch-unshuffle"):
        ctx = patched("unshuffle_as_copy", lambda x, factor: False, ctx, module=layout)
    if name.endswith("+torch-bn"):
        ctx = patched("bn_relu_applies", lambda *args: False, ctx, module=batchnorm)
    if full_name.endswith("+before"):
        if args.before is None:
            raise SystemExit(f"step_variants.py: {full_name} needs --before PATH (another checkout)")
        models = args.before / "src/mnist_classifier/models"
        ctx = patched("SOURCE", models / pooling.SOURCE.name,
                      patched("CONV_SOURCE", models / pooling.CONV_SOURCE.name, ctx))
    t0 = time.perf_counter()
    with ctx():
        step(torch.arange(args.batch_size))  # warm-up; for compile, the compilation
    return Variant(full_name, step, ctx, time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="guide-cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--chunk", type=int, default=40, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--skip", nargs="+", default=[], help="leave these out of the default variants")
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--before", type=Path, default=None, help="another checkout, for the V+before variants")
    args = parser.parse_args()
    kept_memory = keep_freed_memory() if args.keep_freed_memory else False
    names = args.variants or ["kept", "kept+autograd", "kept+torch-step", "kept+no-native", "nchw", "adam-foreach",
                              "adam-for-loop", "no-ftz", "no-onednn", "bare", "compile", "split-threads"]
    if cpu_has_native_bf16() and not args.variants:
        names += ["onednn-bf16", "bf16-autocast", "bf16-weights", "bf16-weights+no-native",
                  "split-threads-bf16"]
    if cpu_has_amx_bf16() and not args.variants:
        names += ["bf16-weights+wide-kernel"]
    names = [n for n in names if n not in args.skip]
    splits = load_dataset("mnist", args.data_dir)
    images = (splits.train_images.float() / 255 - MEAN) / STD  # (60000, 1, 28, 28)
    labels = splits.train_labels
    variants = [make_variant(n, args, images, labels) for n in names]
    gen = torch.Generator().manual_seed(0)
    ms: dict[str, list[float]] = {v.name: [] for v in variants}
    faults: dict[str, int] = {v.name: 0 for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            batches = torch.randperm(len(labels), generator=gen)[: args.chunk * args.batch_size].view(args.chunk, -1)
            with v.context():
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                for idx in batches:
                    v.step(idx)
                ms[v.name].append((time.perf_counter() - t0) / args.chunk * 1000)
                faults[v.name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    kept = statistics.median(ms["kept"]) if "kept" in ms else None
    for v in variants:
        med = statistics.median(ms[v.name])
        print(json.dumps({"variant": v.name, "model": args.model, "batch": args.batch_size,
                          "threads": THREADS.get(base_of(v.name).removesuffix("-bf16"),
                                                 torch.get_num_threads()),
                          "ms_per_step_median": round(med, 3),
                          "min": round(min(ms[v.name]), 3), "max": round(max(ms[v.name]), 3),
                          "speed_vs_kept": round(kept / med, 3) if kept else None,
                          "first_step_seconds": round(v.setup_seconds, 2),
                          "page_faults_per_step": round(faults[v.name] / (args.rounds * args.chunk), 1),
                          "keep_freed_memory": kept_memory}))


if __name__ == "__main__":
    main()
