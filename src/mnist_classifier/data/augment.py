"""Batched, on-device data augmentation: one random affine transform per image, applied to a whole batch
with ``affine_grid`` + ``grid_sample`` (no per-image Python)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineAugment:
    """Random rotation (degrees), translation (fraction of the image side) and scale (relative)."""

    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    translate: float = 0.1  # fraction of width/height, uniform in [-translate, translate]
    scale: float = 0.1  # uniform zoom in [1 - scale, 1 + scale]
    flip: bool = False  # mirror half the images left-right (photos; never digits, where it changes the class)

    def __call__(self, x: torch.Tensor, background: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform ``x`` (B, C, H, W) float; ``background`` (1, C, 1, 1) fills the area shifted in.

        ``generator`` (on ``x``'s device) makes the draws reproducible.
        """
        b = x.shape[0]
        # (B, 4) uniform in [-1, 1]; a fifth column only with flip, so runs without it draw what they always did
        u = torch.rand(b, 5 if self.flip else 4, device=x.device, generator=generator) * 2 - 1
        angle = u[:, 0] * math.radians(self.rotate)
        zoom = 1 + u[:, 1] * self.scale
        # affine_grid maps output coordinates to input coordinates in [-1, 1]; dividing by zoom enlarges.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        mirror = torch.where(u[:, 4] < 0, -1.0, 1.0) if self.flip else torch.ones_like(cos)  # (B,) -1 flips x
        theta = torch.stack([
            torch.stack([cos * mirror, -sin, u[:, 2] * self.translate * 2], dim=1),
            torch.stack([sin * mirror, cos, u[:, 3] * self.translate * 2], dim=1),
        ], dim=1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # grid_sample pads with zeros; shift so that zero is the background level, then shift back.
        out = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return (out + background).contiguous(memory_format=keep)
