"""``ModelConfig``: how to build a model, saved in every checkpoint so that it rebuilds its own architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """How to build a model; saved in every checkpoint so it rebuilds its own architecture."""

    name: str = "guide-cnn"
    in_channels: int = 1  # 1 for MNIST-family grey images
    image_size: int = 28  # square input, pixels per side
    num_classes: int = 10
    dropout: float = 0.0  # probability, before the last layer; the guide's "add dropout" experiment
    input_size: int = 0  # pixels per side the network resizes its input to (efficientnet-lite0); 0 = its default

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
