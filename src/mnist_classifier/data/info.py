"""What every data set is loaded into: ``Splits`` (uint8 tensors) and its ``DatasetInfo`` (stored in checkpoints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a data set needs to know about its inputs; stored in every checkpoint."""

    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    channels: int
    image_size: int  # square images, pixels per side
    # How people's own images become inputs (images.prepare_image): "digit" (MNIST's own preparation),
    # "object" (light-on-dark grey objects: resize, inverting light backgrounds) or "resize" (as they are).
    preprocess: str = "digit"
    test_fraction: float = 0.0  # folder:PATH data sets: the share of each class held out as the test set

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly types (lists, not tuples), as config.json and checkpoints store it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Splits:
    """A data set's train and test sets as CPU tensors."""

    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, C, H, W) uint8
    test_labels: torch.Tensor  # (M,) int64
    info: DatasetInfo

    def class_balanced(self, per_class: int, n_test: int | None = None) -> "Splits":
        """The first ``per_class`` training images of every class (in file order, so the same images for every
        seed and method), and the first ``n_test`` test images (all by default)."""
        picks = [(self.train_labels == c).nonzero().flatten()[:per_class] for c in range(len(self.info.class_names))]
        index = torch.cat(picks).sort().values
        test = slice(None, n_test)
        return Splits(self.train_images[index], self.train_labels[index], self.test_images[test],
                      self.test_labels[test], self.info)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, H, W)`` on the [0, 1] scale, 4 decimals."""
    # From a 256-bin histogram per channel: exact, and no float copy of the images (CIFAR's would be 1.2 GB).
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)  # (256,)
        mean = float((counts * levels).sum() / counts.sum())
        var = float((counts * (levels - mean) ** 2).sum() / counts.sum())
        means.append(round(mean, 4))
        stds.append(round(max(var**0.5, 1e-3), 4))
    return tuple(means), tuple(stds)
