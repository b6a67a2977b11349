"""The wider layer's backward kernel (models/conv_pool.cpp) of this checkout against another checkout's, in one
process, on real inputs: what a kernel change buys, without the cross-process drift of this VM (a third within
minutes).

It trains the guide CNN with torch's own layers (Adam 0.001, batch 64, on the real MNIST training images) for
each of --steps, then takes a batch's real second-layer input, the pool's winners (ReLU-zeroed windows
included: their share is the ``live`` figure, and it falls as the network trains, from ~0.7 to ~0.3 in two
epochs) and the loss's gradient at the pool's output. Both libraries run on those, in alternating chunks of
--chunk calls for --rounds rounds; each side's figure is its median µs per call over rounds, and ``same_bits``
says whether the two gave the same gradients to the bit.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python benchmarks/kernel_ab.py --before /tmp/before
    .venv/bin/python benchmarks/kernel_ab.py --before /tmp/before --dtype bf16 --steps 0 938 1876

The other checkout's kernel is built from its own source (native.py caches it under another name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_classifier import native
from mnist_classifier.data import load_dataset
from mnist_classifier.models import ModelConfig, build_model, pooling
from step_variants import MEAN, STD  # MNIST's training-set mean and std, as `mnist train` normalises

NAME = "conv_pool_backward_wide"


def kernels(before: Path, dtype: torch.dtype) -> dict:
    """The wider backward for ``dtype`` from this checkout's source and from ``before``'s."""
    sources = {"after": pooling.CONV_SOURCE, "before": before / "src/mnist_classifier/models/conv_pool.cpp"}
    out = {}
    for side, source in sources.items():
        lib = native.load(source)
        if lib is None:
            raise SystemExit(f"kernel_ab.py: cannot build {source}: {native.why_not(source)}")
        fn = getattr(lib, f"{NAME}_{pooling.SUFFIX[dtype]}")
        fn.argtypes = pooling._SIGNATURES[NAME]
        out[side] = fn
    return out


def layer_inputs(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> dict:
    """The second layer's real input x (B, 16, 14, 14) and weight, the pool's winners (B, 7, 7, 32) and the
    loss's gradient at the pool's output (B, 32, 7, 7), all channels_last, in ``dtype``."""
    cl = torch.channels_last
    with torch.no_grad():
        x = F.max_pool2d(F.relu(model.conv1(images)), 2).to(dtype).contiguous(memory_format=cl)
        weight = model.conv2.weight.detach().to(dtype).contiguous(memory_format=cl)
        z = F.conv2d(x, weight, model.conv2.bias.detach().to(dtype), padding=1)
        _, which = pooling.pool_forward(z, relu=True)
    pooled = F.relu(F.max_pool2d(z.float(), 2)).requires_grad_()  # the rest of the network, from the pool on
    head = model.fc2(F.relu(model.fc1(torch.flatten(pooled, 1))))
    (grad,) = torch.autograd.grad(F.cross_entropy(head, labels), pooled)
    return {"x": x, "weight": weight, "which": which, "grad_y": grad.to(dtype).contiguous(memory_format=cl)}


def call(kernel, t: dict) -> tuple[torch.Tensor, ...]:
    """One call of ``kernel`` on ``t``: the input, weight and bias gradients."""
    x, weight = t["x"], t["weight"]
    b, c, h, w = x.shape
    grads = torch.empty_like(x), torch.empty_like(weight), torch.empty(weight.shape[0], dtype=x.dtype)
    kernel(x.data_ptr(), weight.data_ptr(), t["which"].data_ptr(), t["grad_y"].data_ptr(),
           *(g.data_ptr() for g in grads), b, h, w, c, weight.shape[0], torch.get_num_threads())
    return grads


def compare(fns: dict, t: dict, rounds: int, chunk: int) -> dict:
    """Both sides alternated (the order flips every round): median, min and max µs per call, and their ratio."""
    same = all(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
               for a, b in zip(call(fns["after"], t), call(fns["before"], t)))
    us: dict[str, list[float]] = {"after": [], "before": []}
    for r in range(rounds):
        for side in ("after", "before") if r % 2 else ("before", "after"):
            start = time.perf_counter()
            for _ in range(chunk):
                call(fns[side], t)
            us[side].append((time.perf_counter() - start) / chunk * 1e6)
    row = {f"{side}_us": {"median": round(statistics.median(v)), "min": round(min(v)), "max": round(max(v))}
           for side, v in us.items()}
    ratio = statistics.median(us["before"]) / statistics.median(us["after"])
    return {"live": round((t["which"] < 4).float().mean().item(), 3), "same_bits": same, **row,
            "before_over_after": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 938, 1876], help="training steps before each row")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--chunk", type=int, default=30, help="calls per side per round")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fns = kernels(args.before, dtype)
    splits = load_dataset("mnist", args.data_dir)
    images = (splits.train_images.float() / 255 - MEAN) / STD  # (60000, 1, 28, 28)
    labels = splits.train_labels
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="guide-cnn"))
    model.pool.native = False  # torch's layers train it: the kernels under test stay out of its history
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).repeat(max(args.steps) // 937 + 2)
    done = 0
    for steps in sorted(args.steps):
        for i in range(done, steps):
            idx = order[i * 64:(i + 1) * 64]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        done = steps
        idx = order[steps * 64:(steps + 1) * 64]
        row = compare(fns, layer_inputs(model, images[idx], labels[idx], dtype), args.rounds, args.chunk)
        print(json.dumps({"dtype": args.dtype, "trained_steps": steps, **row}), flush=True)


if __name__ == "__main__":
    main()
