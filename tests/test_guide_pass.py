"""The guide CNN's training pass without autograd (training/guide_pass.py) computes what autograd computes.

`mnist train` in fp32 on a CPU trains the guide CNN through it; everything else keeps autograd's path. The
pass calls the same kernels as the model's forward and its autograd Functions, so the loss is the same bit for
bit and the gradients agree to rounding (some sums run in another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import model_input
from mnist_classifier.device import flush_denormals
from mnist_classifier.models import ModelConfig, build_model
from mnist_classifier.training.distributed import SINGLE
from mnist_classifier.training.guide_pass import GuidePass
from mnist_classifier.training.session import build_session
from mnist_classifier.training.step import TrainStep

CPU = torch.device("cpu")


def guide_model(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="guide-cnn", **config)).to(memory_format=torch.channels_last)


def images(splits, n: int, channels: int = 1, side: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real training images (n, channels, side, side), normalised and channels_last, and their labels; a
    larger side pads the digit with background, more channels repeat it (a CIFAR-sized guide CNN's input)."""
    x = model_input(splits.train_images[:n], splits.info.mean, splits.info.std, CPU)  # (n, 1, 28, 28)
    pad = (side - 28) // 2
    x = F.pad(x, (pad, side - 28 - pad, pad, side - 28 - pad), value=float(x.min()))
    return x.repeat(1, channels, 1, 1).contiguous(memory_format=torch.channels_last), splits.train_labels[:n]


def autograd_loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def pass_loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    guide_pass = GuidePass(model)
    assert guide_pass.applies(x)
    loss = guide_pass(x, y)
    return loss, [p.grad.clone() for p in model.parameters()]


def gap(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """The largest difference between two sets of gradients, relative to the largest value of each tensor."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize("batch, channels, side", [(64, 1, 28), (32, 1, 28), (1, 1, 28), (64, 3, 32)],
                         ids=["guide-batch", "last-batch", "one-image", "cifar-shape"])
def test_the_pass_gives_autograds_loss_and_gradients(splits, batch, channels, side):
    """Fresh and after 30 steps (some ReLUs dead by then), on real images. Measured over seeds 0-2 at 1 and 2
    threads (the 2-core Intel Xeon CPU-7, held to AVX-512 and as it is): the loss equal bit for bit, gradients
    within 9.1e-7 of their tensor's largest value; the bound is 1e-5. With the ReLU's mask left out of the pass's
    backward, this test fails in every case."""
    flush_denormals()
    x, y = images(splits, batch, channels, side)
    train_x, train_y = images(splits, 30 * 64, channels, side)
    for trained_steps in (0, 30):
        model = guide_model(in_channels=channels, image_size=side)
        step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), train_x, train_y)
        for i in range(trained_steps):
            step(torch.arange(64 * i, 64 * (i + 1)))
        loss, grads = autograd_loss_and_grads(model, x, y)
        pass_loss, pass_grads = pass_loss_and_grads(model, x, y)
        assert torch.equal(pass_loss, loss)
        assert pass_loss.grad_fn is None and not pass_loss.requires_grad
        assert gap(pass_grads, grads) < 1e-5


def test_the_pass_adds_to_gradients_already_there_as_backward_does(splits):
    """Without zero_grad between two passes each gradient is the sum of both, in the parameter's own layout."""
    x, y = images(splits, 64)
    model = guide_model()
    _, once = pass_loss_and_grads(model, x, y)
    GuidePass(model)(x, y)  # the gradients of the first pass are still there
    twice = [p.grad for p in model.parameters()]
    assert gap(twice, [2 * g for g in once]) < 1e-6
    assert all(p.grad.stride() == p.stride() for p in model.parameters())


def test_the_step_trains_through_the_pass_as_through_autograd(splits):
    """Twenty steps of 64 real images through the pass and through autograd: losses within 5e-6 and weights
    within 3e-4, the bounds tests/test_speedups.py holds the kept step to against the guide's plain one.
    Measured over seeds 0-2 at 1 and 2 threads: 2.4e-7 and 2.9e-6 (CPU-7, held to AVX-512 and as it is)."""
    flush_denormals()
    x, y = images(splits, 20 * 64)
    steps = []
    for use_pass in (True, False):
        model = guide_model()
        step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), x, y)
        if not use_pass:
            step.guide_pass = None
        steps.append(step)
    assert steps[0].guide_pass.applies(x[:64])  # else both would run through autograd
    for i in range(20):
        idx = torch.arange(64 * i, 64 * (i + 1))
        with_pass, without = (step(idx) for step in steps)
        assert abs(with_pass - without) <= 5e-6
    weights = zip(steps[0].model.parameters(), steps[1].model.parameters())
    assert max((a - b).abs().max().item() for a, b in weights) < 3e-4


def _hook_forward(model):
    model.fc1.register_forward_hook(lambda module, inputs, output: None)


def _hook_gradient(model):
    model.conv1.weight.register_hook(lambda grad: grad)


def _freeze_first_layer(model):
    for p in model.conv1.parameters():
        p.requires_grad_(False)


def _replace_last_layer(model):
    model.fc2 = torch.nn.Linear(128, 10)  # what the pass computes with and writes gradients to: the new one


def _drop_first_bias(model):
    model.conv1.bias = None


def _gelu_head(model):
    model.relu = torch.nn.GELU()  # the forward's ReLU after fc1: the pass computes a ReLU by hand


@pytest.mark.parametrize("change, applies", [
    (lambda model: None, True),
    (lambda model: model.eval(), False),
    (lambda model: setattr(model.dropout, "p", 0.25), False),
    (_hook_forward, False),
    (_hook_gradient, False),
    (_freeze_first_layer, False),
    (lambda model: setattr(model.pool, "native", False), False),
    (lambda model: model.to(memory_format=torch.contiguous_format), False),
    (_replace_last_layer, True),
    (_drop_first_bias, False),
    (_gelu_head, False),
], ids=["as-built", "eval", "dropout", "forward-hook", "gradient-hook", "frozen-layer", "torchs-layers", "nchw",
        "replaced-layer", "no-first-bias", "gelu-head"])
def test_the_step_takes_the_pass_only_where_it_is_the_same_function(splits, change, applies):
    """Each of these can change between two steps, so the step asks every time; where the pass does not apply,
    autograd's path trains the model."""
    x, y = images(splits, 64)
    model = guide_model()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y)
    change(model)  # after the step was built, as between two steps
    assert step.guide_pass.applies(x) is applies
    loss = step(torch.arange(64))
    assert torch.isfinite(loss) and model.fc2.weight.grad is not None


def test_an_empty_batch_takes_autograds_path(splits):
    """No images: autograd's step gives a NaN loss, as torch's cross-entropy of nothing does; the pass steps aside."""
    x, y = images(splits, 64)
    model = guide_model()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y)
    assert step.guide_pass.applies(x[:0]) is False
    assert torch.isnan(step(torch.arange(0)))


@pytest.mark.parametrize("settings", [{"amp_dtype": torch.bfloat16}, {"label_smoothing": 0.1}, {"model": "fast-cnn"}],
                         ids=["bf16-autocast", "label-smoothing", "another-model"])
def test_steps_the_pass_cannot_compute_never_build_it(splits, settings):
    x, y = images(splits, 64)
    model = guide_model() if "model" not in settings else build_model(ModelConfig(name=settings["model"]))
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y,
                     amp_dtype=settings.get("amp_dtype"), label_smoothing=settings.get("label_smoothing", 0.0))
    assert step.guide_pass is None


def test_mnist_train_in_fp32_trains_the_guide_cnn_through_the_pass(splits, data_dir):
    cfg = TrainConfig(device="cpu", data_dir=str(data_dir), train_subset=256, precision="fp32")
    step = build_session(cfg, splits, CPU, SINGLE).learner.loop.step
    assert step.guide_pass is not None and step.guide_pass.applies(step.train_x[:64])
