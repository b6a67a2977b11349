"""Issue 24: the package's 2x2 max-pooling kernel (models/pooling.py, built by native.py) is torch's pooling,
bit for bit, wherever it runs; torch's runs everywhere else, including on a machine whose build fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mnist_classifier import native
from mnist_classifier.data import model_input
from mnist_classifier.models import ModelConfig, build_model
from mnist_classifier.models.pooling import SOURCE, MaxPool2x2, max_pool2x2, native_applies
from mnist_classifier.training.step import Bf16WeightsStep, TrainStep

CPU = torch.device("cpu")


def test_the_kernel_builds_and_loads_on_this_machine():
    """`make` installs a C++ compiler (g++), so the suite's machine must build it: else every CPU test below
    would pass on torch's pooling alone."""
    assert native.load(SOURCE) is not None, native.why_not(SOURCE)


def hostile_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Whole numbers in [-2, 2] (a tie in most windows), -0.0 beside +0.0, NaN and -inf, in channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).float()
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 20]] = -0.0
    flat[torch.randperm(flat.numel(), generator=g)[:7]] = float("nan")
    flat[torch.randperm(flat.numel(), generator=g)[:7]] = float("-inf")
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values in the same places, NaN where the other has NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(64, 16, 28, 28), (64, 32, 14, 14), (3, 48, 7, 9), (1, 16, 2, 3)])
def test_the_kernel_gives_torchs_outputs_and_gradients_exactly(dtype, relu, shape):
    """The guide CNN's two shapes, odd sides (floor mode drops the last row or column, whose gradient is 0) and
    one window; against max_pool2d (then relu), forward and backward, with ties, signed zeros, NaN and -inf."""
    x = hostile_input(shape, dtype, seed=sum(shape))
    assert native_applies(x)
    grad = torch.randn((shape[0], shape[1], shape[2] // 2, shape[3] // 2)).to(dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for pool in (lambda t: max_pool2x2(t, relu), lambda t: max_pool2x2(t, relu, native_ok=False)):
        leaf = x.clone().requires_grad_()
        y = pool(leaf)
        y.backward(grad)
        outs.append(y.detach())
        grads.append(leaf.grad)
    assert same(outs[0], outs[1])
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grads[0], grads[1])


def test_torchs_pooling_where_the_kernel_does_not_apply():
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert native_applies(x)
    assert not native_applies(x.contiguous())  # NCHW
    assert not native_applies(x.double())
    assert not native_applies(torch.randn(4, 8, 8, 8).contiguous(memory_format=torch.channels_last))  # 8 channels
    traced = []
    torch.jit.trace(lambda t: traced.append(native_applies(t)) or t, x, check_trace=False)  # as ONNX export runs
    assert traced == [False]


def guide_step(images: torch.Tensor, labels: torch.Tensor, native_ok: bool, bf16: bool) -> TrainStep:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="guide-cnn")).to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, MaxPool2x2):
            module.native = native_ok
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    return Bf16WeightsStep(model, optimizer, images, labels) if bf16 else TrainStep(model, optimizer, images, labels)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_guide_cnn_trains_to_the_same_weights_with_either_pooling(splits, bf16):
    """Ten of the guide recipe's steps on real images, as `mnist train` runs them (fp32, or bf16 without
    autocast): the same losses and weights, bit for bit, with the kernel and with torch's pooling."""
    images = model_input(splits.train_images[:640], splits.info.mean, splits.info.std, CPU)
    labels = splits.train_labels[:640]
    steps = [guide_step(images, labels, native_ok, bf16) for native_ok in (True, False)]
    for i in range(10):
        idx = torch.arange(64 * i, 64 * (i + 1))
        losses = []
        for step in steps:
            torch.manual_seed(i)  # dropout's mask
            losses.append(step(idx))
        assert torch.equal(losses[0], losses[1])
    for a, b in zip(steps[0].model.parameters(), steps[1].model.parameters()):
        assert torch.equal(a, b)


PROBE = textwrap.dedent("""
    import json, torch
    from mnist_classifier import native
    from mnist_classifier.models import ModelConfig, build_model
    from mnist_classifier.models.pooling import SOURCE, native_applies
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    model = build_model(ModelConfig(name="guide-cnn")).to(memory_format=torch.channels_last)
    model(x).sum().backward()  # trains either way
    print(json.dumps({"loaded": native.load(SOURCE) is not None, "why": native.why_not(SOURCE),
                      "applies": native_applies(x.expand(2, 16, 28, 28).contiguous(memory_format=torch.channels_last))}))
""")


def probe(tmp_path, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def cache_files(tmp_path) -> list[str]:
    folder = tmp_path / "cache" / "mnist-classifier" / "native"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_failed_build_falls_back_to_torch_and_leaves_nothing(tmp_path):
    """A compiler that fails, a missing one, or MNIST_NATIVE=0: the model runs on torch's pooling, the reason
    is kept, and the cache holds no library and no half-written file."""
    failed = probe(tmp_path, CXX="false")
    assert failed == {"loaded": False, "why": failed["why"], "applies": False}
    assert "false" in failed["why"] and "failed" in failed["why"]
    assert cache_files(tmp_path) == []
    missing = probe(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert not missing["loaded"] and "no C++ compiler" in missing["why"]
    assert probe(tmp_path, MNIST_NATIVE="0")["why"] == "MNIST_NATIVE=0"
    assert cache_files(tmp_path) == []


def test_two_processes_building_at_once_both_load_one_library(tmp_path):
    """Two first uses at once on an empty cache (two sweep workers, say): each builds beside the final name and
    renames, so both load a whole library and one file is left."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(r == {"loaded": True, "why": None, "applies": True} for r in results)
    files = cache_files(tmp_path)
    assert len(files) == 1 and files[0].startswith("pool2x2-") and files[0].endswith(".so")
