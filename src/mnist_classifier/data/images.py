"""Turning pixels into model inputs.

Training, evaluation, prediction and serving all go through ``normalize`` (and ``model_input``, which also
moves a batch to its device); images from people are decoded by ``decode.open_image`` and prepared by
``prepare_image`` first, which makes them look like the training images (for MNIST: its own nine steps).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..device import preferred_memory_format
from .decode import NothingToSee, upright

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # what folders and predict pick up (ALLOWED_FORMATS)
# How people's own images become inputs (``prepare_image``): MNIST's own nine steps, or a plain resize.
PREPROCESSES = ("digit", "resize")


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
    x = normalize(images.to(device), mean, std)
    return x.contiguous(memory_format=preferred_memory_format(device))


# ---------------------------------------------------------------------------------------------------------------
# People's own images -> MNIST-style 28x28 digits
#
# MNIST digits were made this way: white ink on black, the digit scaled (keeping its proportions) into a
# 20x20 box with anti-aliasing, then placed in a 28x28 frame with its centre of mass in the middle. A photo
# or a drawing that skips these steps is "confidently wrong" more often than not, so we redo them.

MIN_CONTRAST = 40  # on 0-255: an image whose ink differs from its background by less than this has no digit
INK_THRESHOLD = 0.2  # fraction of the ink's full strength that counts as part of the digit when cropping


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float32 array, in a fifth of its time for the ~100 values of an image border."""
    ordered = np.sort(values)
    n = len(ordered)
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / np.float32(2))


def _to_grey(img: Image.Image) -> np.ndarray:
    """Steps 1-3: EXIF orientation, transparency flattened onto white, greyscale. Returns (H, W) float32 0-255."""
    img = upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        # 16-bit and 32-bit greyscale: scale the full range of the type down to 0-255
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr * (255.0 / top), 0, 255)
    return np.asarray(_on_white(img).convert("L"), dtype=np.float32)


def _on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels flattened onto white (a drawing on a transparent canvas is ink on paper)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def prepare_digit(img: Image.Image) -> torch.Tensor:
    """Steps 1-8 of MNIST's own preparation; returns uint8 ``(1, 28, 28)``, white digit on black.

    Raises ImageError when no digit can be found (a blank or uniform image).
    """
    grey = _to_grey(img)  # (H, W) 0-255
    # 4. Invert when the background is light. The border is mostly background in any framing of a digit.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if _median(border) > 127:
        grey = 255.0 - grey
        border = 255.0 - border
    # 5. Remove the background level (paper is rarely pure white) and stretch the ink to full strength.
    background = _median(border)
    ink = grey - background
    np.maximum(ink, 0, out=ink)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise NothingToSee("shows no digit (it is blank or all one shade)")
    ink *= 255.0 / peak
    # 6. Crop to the digit's bounding box.
    inked = ink > INK_THRESHOLD * 255  # (H, W) bool
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    # 7. Scale into a 20x20 box keeping proportions; area-averaging (BOX) anti-aliases like MNIST's scanner.
    h, w = ink.shape
    scale = 20.0 / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(ink.astype(np.float32), mode="F").resize((new_w, new_h), Image.BOX), dtype=np.float32)
    # 8. Place in 28x28 with the centre of mass at (14, 14), where MNIST digits have it (measured: 14.00 +- 0.29).
    total = float(small.sum())
    ys, xs = np.indices(small.shape)
    cy, cx = (float((ys * small).sum()) / total, float((xs * small).sum()) / total) if total > 0 else (new_h / 2, new_w / 2)
    top = min(max(round(14.0 - cy), 0), 28 - new_h)
    left = min(max(round(14.0 - cx), 0), 28 - new_w)
    frame = np.zeros((28, 28), dtype=np.float32)
    frame[top : top + new_h, left : left + new_w] = small
    return torch.from_numpy(np.clip(np.rint(frame), 0, 255).astype(np.uint8)).unsqueeze(0)


def preprocess(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An image of a digit -> the normalised ``(1, 1, 28, 28)`` model input (all nine steps)."""
    return normalize(prepare_digit(img).unsqueeze(0), mean, std)


# ---------------------------------------------------------------------------------------------------------------
# Other data sets: objects and colour images


def _rgb(img: Image.Image) -> np.ndarray:
    """EXIF orientation, transparency onto white, RGB. Returns (H, W, 3) uint8."""
    img = upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.clip(np.rint(_to_grey(img)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(_on_white(img).convert("RGB"), dtype=np.uint8)


def prepare_resized(img: Image.Image, channels: int, size: int, light_on_dark: bool = False) -> torch.Tensor:
    """Any image -> uint8 ``(channels, size, size)``: squashed to the square with area averaging.

    ``light_on_dark`` (Fashion-MNIST, KMNIST: light objects on black) inverts a grey image whose border is
    light, as ``prepare_digit`` does, so a photo on white paper looks like the training images.
    """
    rgb = _rgb(img)
    if rgb.shape[0] * rgb.shape[1] == 0:
        raise NothingToSee("has no pixels")
    if channels == 1:
        grey = np.asarray(Image.fromarray(rgb).convert("L"))
        if light_on_dark:
            border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
            if np.median(border) > 127:
                grey = 255 - grey
        small = np.asarray(Image.fromarray(grey).resize((size, size), Image.BOX))
        return torch.from_numpy(small.copy()).unsqueeze(0)
    small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BOX))
    return torch.from_numpy(small.copy()).permute(2, 0, 1).contiguous()  # (3, size, size)


def prepare_image(img: Image.Image, preprocess_mode: str, channels: int, size: int) -> torch.Tensor:
    """An image -> uint8 ``(channels, size, size)`` prepared the way the model's data set was.

    ``digit``: MNIST's own nine steps (28x28 grey only); ``object``: resize with light backgrounds inverted;
    ``resize``: resize as it is. Raises ImageError when no input can be made.
    """
    if preprocess_mode == "digit" and channels == 1 and size == 28:
        return prepare_digit(img)
    return prepare_resized(img, channels, size, light_on_dark=preprocess_mode in ("object", "digit"))
