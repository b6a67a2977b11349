"""A generated image folder of three classes (circle, square, triangle): a data set of people's own images
for tests and benchmarks, made in a second, with one sub-folder per class as `--dataset folder:PATH` reads."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def shape(kind: str, rng: np.random.Generator, fmt: str, path) -> None:
    """A coloured circle, square or triangle of random size and place on a random light background."""
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (64, 64), bg)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(12, 24))
    cx, cy = (int(v) for v in rng.integers(r + 2, 62 - r, 2))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=ink)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    img.save(path.with_suffix(f".{fmt}"))


def shapes_folder(root, per_class: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for kind in ("circle", "square", "triangle"):
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            shape(kind, rng, ("png", "jpg", "bmp")[i % 3], root / kind / f"{i:03d}")
