"""Turning pixels into model inputs. Training, evaluation, prediction and serving all go through ``normalize``."""

from __future__ import annotations

from typing import Sequence

import torch


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` on any device -> float32 ``(N, C, H, W)`` with ``(x/255 - mean) / std`` per channel.

    The same arithmetic as torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``.
    """
    x = images.to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> normalised float32 on ``device``, in the memory layout the model runs in.

    Training, evaluation and prediction all use this, so a reloaded model sees exactly what training saw.
    """
    from .device import preferred_memory_format

    x = normalize(images.to(device), mean, std)
    return x.contiguous(memory_format=preferred_memory_format(device))
