"""Models by name: ``--model NAME`` looks them up here. A new model is a class in ``cnn.py`` (or a module of
its own) taking a ``ModelConfig``, plus one line in ``MODELS``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import UserError
from .cnn import (BNCNN, M5CNN, FastCNN, FastCNNCentre, FastCNNCentre16, FastCNNDeep, GuideCNN, GuideCNNDeep,
                  ResCNN)
from .config import ModelConfig
from .efficientnet import EfficientNetLite0

# name -> constructor taking a ModelConfig. `--model NAME` looks models up here.
MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "guide-cnn": GuideCNN,
    "guide-cnn-deep": GuideCNNDeep,
    "fast-cnn": FastCNN,
    "fast-cnn-deep": FastCNNDeep,
    "fast-cnn-centre": FastCNNCentre,
    "fast-cnn-centre-16": FastCNNCentre16,
    "bn-cnn": BNCNN,
    "res-cnn": ResCNN,
    "m5-cnn": M5CNN,
    "efficientnet-lite0": EfficientNetLite0,
}
# Models that take raw pixels in [0, 1] and normalise (and resize) inside: the data pipeline feeds them with
# mean 0 and std 1, and --pretrained / --input-size apply to them.
SELF_NORMALISING = {"efficientnet-lite0"}
# Models that drop a border of every image, each with the model that keeps it: made for glyphs prepared as
# MNIST's (scaled into a 20x20 box and centred in 28x28, the "digit" preparation). On data that fills the frame
# they lose accuracy (Fashion-MNIST: 1.6 points on a validation split, BENCHMARKS.md).
CENTRED_ONLY = {"fast-cnn-centre": "fast-cnn-deep", "fast-cnn-centre-16": "fast-cnn-deep"}


# Earlier names, still accepted by --model and found in checkpoints written before the rename.
ALIASES = {"seed-cnn": "guide-cnn", "seed-cnn-deep": "guide-cnn-deep"}


def check_model(name: str) -> str:
    """The registry's name for ``name`` (an alias resolved); UserError if there is none."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return name


def build_model(cfg: ModelConfig) -> nn.Module:
    """Construct the model named in ``cfg``; an unknown name is a UserError."""
    return MODELS[check_model(cfg.name)](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
