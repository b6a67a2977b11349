"""Models, by name. This module imports nothing from training, so a checkpoint can rebuild its model anywhere.

Every model maps a normalised batch ``(B, C, H, W)`` float to logits ``(B, num_classes)``; no softmax inside,
so the loss, the exporters and the server decide what to do with the scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class ModelConfig:
    """How to build a model; saved in every checkpoint so it rebuilds its own architecture."""

    name: str = "seed-cnn"
    in_channels: int = 1  # 1 for MNIST-family grey images
    image_size: int = 28  # square input, pixels per side
    num_classes: int = 10
    dropout: float = 0.0  # probability, before the last layer; the seed guide's "add dropout" experiment

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SeedCNN(nn.Module):
    """The seed guide's CNN: two 3x3 conv + ReLU + 2x2 max-pool blocks, then 1568 -> 128 -> 10.

    With the defaults it has 206,922 parameters:
    conv1 1*16*9+16 = 160, conv2 16*32*9+32 = 4,640, fc1 1568*128+128 = 200,832, fc2 128*10+10 = 1,290.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.in_channels, 16, kernel_size=3, padding=1)  # padding 1 keeps H, W
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)  # halves H and W
        self.relu = nn.ReLU()
        side = cfg.image_size // 4  # two pools: 28 -> 14 -> 7
        self.flat_features = 32 * side * side  # 32 * 7 * 7 = 1568 for MNIST
        self.fc1 = nn.Linear(self.flat_features, 128)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(128, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The guide applies ReLU then pool; pool then ReLU is the same function with the same gradients
        # (ReLU is monotonic, so max and ReLU commute, ties included) and runs ReLU on 4x fewer values.
        x = self.relu(self.pool(self.conv1(x)))  # (B, 16, 14, 14)
        x = self.relu(self.pool(self.conv2(x)))  # (B, 32, 7, 7)
        x = torch.flatten(x, 1)  # (B, 1568)
        x = self.dropout(self.relu(self.fc1(x)))  # (B, 128)
        return self.fc2(x)  # (B, 10) logits


# name -> constructor taking a ModelConfig. Later models register here and `--model NAME` finds them.
MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "seed-cnn": SeedCNN,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Construct the model named in ``cfg`` (raises KeyError for an unknown name; the CLI validates first)."""
    return MODELS[cfg.name](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
