"""CIFAR-10 from torchvision's python pickles: dicts of a (N, 3072) uint8 array (R, G then B planes) and labels."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from .fetch import ArrayOnlyUnpickler
from .info import DatasetInfo, Splits, channel_stats

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
MAX_BATCH = 50_000  # images in one batch file (the real ones hold 10,000)


def _members(data_dir: Path) -> Callable[[str], bytes]:
    """A reader of the batch files, from the extracted folder or straight out of the archive."""
    folder = data_dir / CIFAR_FOLDER
    if all((folder / f).is_file() for f in CIFAR_TRAIN + CIFAR_TEST):
        return lambda member: (folder / member).read_bytes()
    archive = data_dir / CIFAR_ARCHIVE
    if archive.is_file():
        try:
            with tarfile.open(archive) as tar:
                blobs = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                         if m.isfile() and Path(m.name).name in CIFAR_TRAIN + CIFAR_TEST}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"{archive}: cannot read the archive ({exc})") from None

        def read(member: str) -> bytes:
            if member not in blobs:
                raise UserError(f"{archive} lacks {CIFAR_FOLDER}/{member}")
            return blobs[member]

        return read
    raise UserError(
        f"cifar10 files missing: put {CIFAR_FOLDER}/ ({', '.join(CIFAR_TRAIN + CIFAR_TEST)}) or {CIFAR_ARCHIVE} in "
        f"{data_dir}, e.g. with torchvision.datasets.CIFAR10(root='{data_dir}', download=True) on a machine with internet"
    )


def _batch(blob: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        # The guarded unpickler: arrays, lists and dicts only, never code. latin1, as torchvision reads
        # them: the batches are Python 2 pickles of numpy arrays.
        batch = ArrayOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()
        data, labels = batch["data"], batch["labels"]
        # The types are checked before anything is expanded: a pickle can reference one list from many
        # places, so a few KB of nested lists would become gigabytes in np.asarray.
        if not isinstance(data, np.ndarray) or not isinstance(labels, list) or len(labels) > MAX_BATCH \
                or not all(type(v) is int for v in labels):
            raise TypeError("expected a numpy array 'data' and a list of at most 50,000 whole-number 'labels'")
        data, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError, AttributeError) as exc:
        raise UserError(f"{where}: not a CIFAR-10 batch ({str(exc)[:160]})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"{where}: expected (N, 3072) pixels and N labels, got {list(data.shape)} and {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{where}: labels must be 0-9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar10(data_dir: Path) -> Splits:
    """CIFAR-10's 50,000 training and 10,000 test images, (N, 3, 32, 32) uint8."""
    read = _members(data_dir)
    parts = {m: _batch(read(m), f"{data_dir / CIFAR_FOLDER / m}") for m in CIFAR_TRAIN + CIFAR_TEST}
    train_x = torch.cat([parts[m][0] for m in CIFAR_TRAIN])
    train_y = torch.cat([parts[m][1] for m in CIFAR_TRAIN])
    test_x, test_y = parts["test_batch"]
    mean, std = channel_stats(train_x)
    info = DatasetInfo("cifar10", CIFAR10_CLASSES, mean, std, channels=3, image_size=32, preprocess="resize")
    return Splits(train_x, train_y, test_x, test_y, info)
