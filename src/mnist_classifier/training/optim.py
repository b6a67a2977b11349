"""What updates the weights: the optimizer, the learning-rate schedule, and the moving average of the weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import TrainConfig


def group_lr(lr: float, group: dict) -> float:
    """A param group's learning rate when the run's is ``lr``: discriminative rates (a pretrained backbone at
    ``lr_scale`` = --backbone-lr of the head's) keep their ratio through every schedule and resume."""
    return lr * group.get("lr_scale", 1.0)


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, with its learning rate, momentum (Adam's: betas) and weight decay.
    ``params`` may be param groups with an ``lr_scale`` each (a fraction of ``cfg.lr``)."""
    params = [{**g, "lr": group_lr(cfg.lr, g)} if isinstance(g, dict) else g for g in params]
    # The fused kernels update every parameter in one call instead of a dozen small ops per tensor;
    # same arithmetic as the default path (CPU and CUDA have them, MPS partly).
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if cfg.cuda_graphs and device.type == "cuda":
        fused["capturable"] = True  # step counts on the device, so a captured step can advance them
    wd, betas = cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=wd, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=wd, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.momentum > 0, **fused)
    # rmsprop: the one left; TrainConfig's declaration of --optimizer has already refused any other name
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, foreach=True,
                               capturable=bool(fused.get("capturable")))


def learning_rate(step: int, total_steps: int, base: float, schedule: str, warmup: float) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``. A pure function of its inputs."""
    if schedule == "constant":
        return base
    warm = int(warmup * total_steps)
    if step < warm:
        start = base / 10 if schedule == "onecycle" else 0.0
        return start + (base - start) * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)  # 0 -> 1 over the rest of training
    if schedule == "onecycle":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_value(lr: float | torch.Tensor) -> float:
    """A param group's learning rate as a float, whether a number or CudaGraphStep's device tensor."""
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class EMA:
    """An exponential moving average of a model's weights (and a copy of its buffers, e.g. batch-norm stats).

    Averaging the last few hundred steps' weights smooths out the noise of the final steps; the average is
    what gets evaluated and saved. The decay ramps up from 0 so early, random weights are forgotten fast.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.updates = 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # One multi-tensor kernel per list instead of one small kernel per tensor (launch-bound on a GPU).
        mine, theirs = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(mine, theirs, 1.0 - d)
        buffers = list(self.model.buffers())  # batch-norm statistics; a model may have none
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
