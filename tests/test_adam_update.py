"""Adam's update without ``Adam.step``'s wrapper (training/adam_update.py) is ``Adam.step``'s update, bit for bit.

The training step calls torch's functional ``adam`` on the optimizer's own state where nothing else would
notice. Each case trains two copies of the same model on the same real MNIST batches, one through the update and
one through ``Adam.step``, and compares every weight and every moment exactly. ``Adam.step`` is counted, so a
case also shows which path ran: only the first step (which creates the state) goes through it where the update
applies, and every step where it does not.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import model_input
from mnist_classifier.models import ModelConfig, build_model
from mnist_classifier.training.adam_update import AdamUpdate
from mnist_classifier.training.distributed import SINGLE
from mnist_classifier.training.session import build_session
from mnist_classifier.training.step import Bf16WeightsStep, TrainStep

CPU = torch.device("cpu")
STEPS = 12


@pytest.fixture
def adam_steps(monkeypatch) -> list[int]:
    """How many times torch's ``Adam.step`` ran, or AdamW's (the same method, which AdamW may hold as its own)."""
    calls = [0]

    def counting(torchs):
        def counted(self, *args, **kwargs):
            calls[0] += 1
            return torchs(self, *args, **kwargs)
        counted.hooked = getattr(torchs, "hooked", False)  # torch wraps it with the step hooks where it was not yet
        return counted
    for kind in (torch.optim.Adam, torch.optim.AdamW):
        if "step" in vars(kind):
            monkeypatch.setattr(kind, "step", counting(vars(kind)["step"]))
    return calls


def batches(splits) -> tuple[torch.Tensor, torch.Tensor]:
    x = model_input(splits.train_images[: STEPS * 64], splits.info.mean, splits.info.std, CPU)
    return x.contiguous(memory_format=torch.channels_last), splits.train_labels[: STEPS * 64]


def build(splits, settings: dict, seed: int = 0) -> TrainStep:
    """A training step on a fresh model (the same weights for the same seed) with the optimizer ``settings`` ask."""
    settings = dict(settings)
    name, kind = settings.pop("model", "guide-cnn"), settings.pop("optimizer", torch.optim.Adam)
    bf16, two_groups = settings.pop("bf16_weights", False), settings.pop("two_groups", False)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name)).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    groups = ([{"params": params[:2], "lr": 1e-4}, {"params": params[2:]}] if two_groups else params)
    optimizer = kind(groups, lr=1e-3, **{"fused": True, **settings})
    return (Bf16WeightsStep if bf16 else TrainStep)(model, optimizer, *batches(splits))


def train(step: TrainStep, schedule: bool = True) -> None:
    for i in range(STEPS):
        if i == STEPS // 2:
            step.freeze(list(step.model.parameters())[:2])  # a layer stops: no gradient, skipped by both
        step(torch.arange(64 * i, 64 * (i + 1)), lr=1e-3 * (1 + i) / STEPS if schedule else None)


def assert_same_state(a: TrainStep, b: TrainStep) -> None:
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.optimizer.state[p][key], b.optimizer.state[q][key]), key


@pytest.mark.parametrize("settings", [
    {}, {"weight_decay": 0.01}, {"optimizer": torch.optim.AdamW, "weight_decay": 0.05}, {"maximize": True},
    {"betas": (0.8, 0.95), "eps": 1e-6}, {"two_groups": True}, {"model": "fast-cnn"}, {"bf16_weights": True},
], ids=["plain", "weight-decay", "adamw", "maximize", "betas-eps", "two-groups", "fast-cnn", "bf16-weights"])
def test_the_update_is_adam_steps_bit_for_bit(splits, adam_steps, settings):
    """Through a learning-rate schedule and a layer frozen halfway: the same weights and moments, exactly."""
    ours, torchs = build(splits, settings), build(splits, settings)
    torchs.adam_update = None
    train(ours)
    assert adam_steps[0] == 1  # the first step, which creates the state; the other eleven took the update
    assert ours.adam_update.ready() is not None  # it would apply to the gradients of the last step too
    train(torchs)
    assert adam_steps[0] == 1 + STEPS
    assert_same_state(ours, torchs)


def _step_hook(step: TrainStep, calls: list[int]) -> None:
    step.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: calls.append(1))


def _step_post_hook(step: TrainStep, calls: list[int]) -> None:
    step.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: calls.append(1))


def _wrapped_step(step: TrainStep, calls: list[int]) -> None:
    plain = step.optimizer.step

    def wrapped(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)
    step.optimizer.step = wrapped


def _amsgrad(step: TrainStep, calls: list[int]) -> None:
    for group in step.optimizer.param_groups:
        group["amsgrad"] = True


def _not_fused(step: TrainStep, calls: list[int]) -> None:
    for group in step.optimizer.param_groups:
        group["fused"] = False


@pytest.mark.parametrize("change, watched", [
    (_step_hook, True), (_step_post_hook, True), (_wrapped_step, True), (_amsgrad, False), (_not_fused, False),
], ids=["pre-hook", "post-hook", "wrapped-step", "amsgrad", "not-fused"])
def test_each_step_adam_step_would_run_otherwise_runs_it(splits, adam_steps, change, watched):
    """Made after the step was built, as between two steps: every step then goes through ``Adam.step``, and a
    hook or a wrapper sees each of them."""
    step, calls = build(splits, {}), []
    change(step, calls)
    assert step.adam_update.ready() is None
    train(step, schedule=False)
    assert adam_steps[0] == STEPS
    assert len(calls) == (STEPS if watched else 0)


def test_a_hook_for_every_optimizer_sends_steps_to_adam_step(splits, adam_steps):
    step, calls = build(splits, {}), []
    handle = register_optimizer_step_pre_hook(lambda *args: calls.append(1))
    try:
        train(step, schedule=False)
    finally:
        handle.remove()
    assert adam_steps[0] == STEPS and len(calls) == STEPS
    train(step, schedule=False)  # the hook gone, the update applies again
    assert adam_steps[0] == STEPS


def test_a_torch_lr_scheduler_sees_every_step(splits, adam_steps):
    """A scheduler wraps ``step`` to know it was called: it warns if its own step comes first. It never warns
    here, and its learning rates are the ones a plain Adam gets."""
    ours, torchs = build(splits, {}), build(splits, {})
    torchs.adam_update = None
    for step in (ours, torchs):
        scheduler = torch.optim.lr_scheduler.StepLR(step.optimizer, step_size=3, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for i in range(STEPS):
                step(torch.arange(64 * i, 64 * (i + 1)))
                scheduler.step()
    assert adam_steps[0] == 2 * STEPS
    assert_same_state(ours, torchs)


def test_under_torchs_profiler_every_step_is_adam_steps(splits, adam_steps):
    """A profile names each optimizer step by ``Adam.step``'s scope; under the profiler the steps keep it."""
    step = build(splits, {})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        train(step, schedule=False)
    assert adam_steps[0] == STEPS
    assert sum(event.name == "Optimizer.step#Adam.step" for event in profile.events()) == STEPS


def test_other_optimizers_get_no_update(splits):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="guide-cnn"))
    assert AdamUpdate.for_optimizer(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    assert AdamUpdate.for_optimizer(torch.optim.RMSprop(model.parameters(), lr=0.1)) is None


def test_mnist_train_steps_adam_through_the_update(splits, data_dir):
    cfg = TrainConfig(device="cpu", data_dir=str(data_dir), train_subset=256)
    step = build_session(cfg, splits, CPU, SINGLE).learner.loop.step
    assert step.adam_update is not None and step.adam_update.optimizer is step.optimizer
    step(torch.arange(64))  # creates the state; the optimizer mnist train builds then takes the update
    assert step.adam_update.ready() is not None
