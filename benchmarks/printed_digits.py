"""Digits that are not from MNIST: printed digits rendered in several fonts, sizes, positions, polarities,
colours and file formats. ``render_set`` is also used by the tests; run this file to print the accuracy
of a checkpoint on them as one JSON line.

    .venv/bin/python benchmarks/printed_digits.py --checkpoint runs/<run>/model.pt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

# matplotlib ships these fonts, so every machine with the project installed has them
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
         "DejaVuSans-Oblique.ttf", "cmss10.ttf", "STIXGeneral.ttf"]
FORMATS = ["png", "jpg", "bmp", "gif", "webp", "rgba.png"]


def render_digit(digit: int, font: str, size: int, canvas: tuple[int, int], offset: tuple[float, float],
                 dark_on_light: bool, fmt: str, path: Path, rng: random.Random) -> Path:
    """Draw one digit and save it as ``fmt``; returns the file path."""
    w, h = canvas
    ink, paper = ((20, 20, 30), (245, 242, 235)) if dark_on_light else ((240, 240, 240), (15, 15, 25))
    transparent = fmt == "rgba.png"
    img = Image.new("RGBA" if transparent else "RGB", canvas, (0, 0, 0, 0) if transparent else paper)
    draw = ImageDraw.Draw(img)
    f = ImageFont.truetype(str(FONT_DIR / font), size)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=f)
    x = (w - (right - left)) * offset[0] - left
    y = (h - (bottom - top)) * offset[1] - top
    draw.text((x, y), str(digit), font=f, fill=(20, 20, 30, 255) if transparent else ink)
    # a slightly tilted page, as in a photo
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, fillcolor=(0, 0, 0, 0) if transparent else paper)
    path = path.with_suffix("." + fmt)
    if fmt == "jpg":
        img.save(path, quality=rng.choice([70, 85, 95]))
    elif fmt == "gif":
        img.convert("L").save(path)
    else:
        img.save(path)
    return path


def render_set(out_dir: str | Path, per_digit: int = 24, seed: int = 0) -> list[tuple[Path, int]]:
    """``per_digit`` images of each digit 0-9 with varied font, size, position, polarity and format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for digit in range(10):
        for i in range(per_digit):
            canvas = rng.choice([(64, 64), (200, 200), (320, 240), (150, 400)])
            size = int(min(canvas) * rng.uniform(0.35, 0.8))
            offset = (rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9))
            dark = rng.random() < 0.7  # most people photograph dark ink on light paper
            fmt = FORMATS[(digit * per_digit + i) % len(FORMATS)]
            font = FONTS[i % len(FONTS)]
            path = render_digit(digit, font, size, canvas, offset, dark, fmt, out / f"{digit}_{i:03d}", rng)
            items.append((path, digit))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--per-digit", type=int, default=48)
    parser.add_argument("--out", default="runs/printed-digits")
    args = parser.parse_args()
    import torch

    from mnist_classifier.models import checkpoint
    from mnist_classifier.inference import predict_files

    items = render_set(args.out, args.per_digit)
    model, info, _ = checkpoint.load_model(args.checkpoint, "cpu")
    preds, errors = predict_files([p for p, _ in items], model, info, torch.device("cpu"))
    truth = {str(p): d for p, d in items}
    correct = sum(truth[p.path] == p.digit for p in preds)
    by_format: dict[str, list[int]] = {}
    for p in preds:
        fmt = "rgba.png" if p.path.endswith(".rgba.png") else p.path.rsplit(".", 1)[-1]
        by_format.setdefault(fmt, []).append(int(truth[p.path] == p.digit))
    print(json.dumps({
        "benchmark": "printed_digits", "checkpoint": args.checkpoint, "images": len(items), "errors": len(errors),
        "accuracy": round(100 * correct / len(items), 2),
        "accuracy_by_format": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(by_format.items())},
    }))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
