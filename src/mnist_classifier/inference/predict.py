"""Predicting people's own images: files and folders in, one result (or one error) per image out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .. import fileio
from ..config import EVAL_BATCH_SIZE
from ..data import IMAGE_SUFFIXES, DatasetInfo, ImageError, normalize, open_image, prepare_image
from ..errors import UserError
from ..runs import held_work

LOW_CONFIDENCE = 0.5  # below this the top class is more likely wrong than right; say so


@dataclass
class Prediction:
    """One image's answer. ``index`` is the class number (the digit itself for MNIST, not for other sets)."""

    path: str
    index: int  # class index into the checkpoint's class names
    label: str  # class name (the digit itself for MNIST)
    confidence: float  # probability of the top class, 0-1
    top_k: list[dict[str, Any]] = field(default_factory=list)  # [{"label", "index", "probability"}], best first
    probabilities: list[float] = field(default_factory=list)

    @property
    def low_confidence(self) -> bool:
        return self.confidence < LOW_CONFIDENCE

    def to_json(self) -> dict[str, Any]:
        # "digit" repeats "index" for clients written before other data sets existed
        return {"path": self.path, "index": self.index, "digit": self.index, "label": self.label, "confidence": round(self.confidence, 6),
                "top_k": self.top_k, "low_confidence": self.low_confidence}


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders replaced by the image files inside them (recursively, sorted by path).

    A missing path is kept, so that it gets its own error line. In a folder, sub-folders that cannot be read
    are skipped (``os.walk``) and links to folders are not followed (a loop would never end); anything named
    like an image is kept, so one that is not a regular file gets its own error line too.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [Path(parent, name) for parent, _, names in os.walk(p) for name in names
                     if Path(name).suffix.lower() in IMAGE_SUFFIXES]
            out.extend(sorted(found))
        else:
            out.append(p)
    return out


@torch.inference_mode()
def classify(model: nn.Module, digits: torch.Tensor, info: DatasetInfo, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` prepared images -> probabilities ``(N, num_classes)`` on the CPU."""
    model.eval()
    # In batches, as evaluation scores: a whole folder at once would hold every image's feature maps (the
    # guide CNN's first layer alone is 50 KB per image, 1 GB for 20,000 files).
    probs = [F.softmax(model(normalize(digits[i : i + EVAL_BATCH_SIZE].to(device), info.mean, info.std)).float(), dim=1)
             for i in range(0, len(digits), EVAL_BATCH_SIZE)]
    return torch.cat(probs).cpu() if probs else torch.zeros(0, len(info.class_names))


def to_prediction(path: str, probs: torch.Tensor, class_names: Sequence[str], top_k: int) -> Prediction:
    """One image's probabilities ``(classes,)`` -> its Prediction, the top ``top_k`` classes best first.

    The server calls this once per request, so it converts to Python numbers once (``tolist``) instead of
    element by element: a third of the time (29 -> 11 us for 10 classes, with the server's body).
    """
    order = probs.topk(min(top_k, len(class_names))).indices.tolist()
    values = probs.tolist()
    rounded = [round(p, 6) for p in values]
    best = order[0]
    return Prediction(
        path=path, index=best, label=class_names[best], confidence=values[best],
        top_k=[{"label": class_names[i], "index": i, "probability": rounded[i]} for i in order],
        probabilities=rounded,
    )


def _to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> a grey or RGB PIL image."""
    return Image.fromarray(image[0].numpy(), mode="L") if image.shape[0] == 1 else Image.fromarray(image.permute(1, 2, 0).numpy())


def _unique_names(out_dir: Path, paths: Sequence[Path]) -> list[Path]:
    """``DIR/<stem>.png`` per input, numbered ``<stem>-2.png``, ... when two inputs share a stem (x/7.png, y/7.jpg)
    or the name is taken in DIR: a file already there (the user's own 7.png, when DIR is the input folder) stays."""
    used: set[str] = set()
    names = []
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name in used or (out_dir / name).exists():
            n += 1
            name = f"{path.stem}-{n}.png"
        used.add(name)
        names.append(out_dir / name)
    return names


def predict_files(
    paths: Sequence[Path], model: nn.Module, info: DatasetInfo, device: torch.device, top_k: int = 3,
    save_preprocessed: str | os.PathLike | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predict every file; return (predictions, errors as (path, message)), both in input order."""
    if save_preprocessed and (held := held_work(Path(save_preprocessed))):
        raise UserError(f"--save-preprocessed {save_preprocessed} holds {held}; choose a folder of its own")
    digits, kept, errors = [], [], []
    for path in paths:
        try:
            # prepared the way the checkpoint's data set was (MNIST digits, Fashion objects, colour photos)
            digits.append(prepare_image(open_image(path), info.preprocess, info.channels, info.image_size))
            kept.append(path)
        except ImageError as exc:
            errors.append((str(path), str(exc)))
    if save_preprocessed:
        for target, digit in zip(_unique_names(Path(save_preprocessed), kept), digits):
            # Always PNG: what the model saw (28x28 white on black for MNIST).
            fileio.write_with(target, lambda tmp, d=digit: _to_pil(d).save(tmp, format="PNG"))
    if not digits:
        return [], errors
    probs = classify(model, torch.stack(digits), info, device)
    return [to_prediction(str(p), pr, info.class_names, top_k) for p, pr in zip(kept, probs)], errors
