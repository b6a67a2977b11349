"""Your own images as a data set: ``--dataset folder:PATH`` in ImageFolder layout.

    PATH/cat/001.jpg, PATH/cat/002.png, PATH/dog/...        one sub-folder per class (split by a fixed seed)
    PATH/train/cat/..., PATH/test/cat/...                    or the split made for you

Every image goes through ``images.prepare_image``: ``digit`` gives MNIST's own preparation (28x28 grey,
for digit-like images), ``resize`` squashes it to ``image_size`` (grey when every image is grey, else RGB).
The images are decoded once, here, into the same uint8 tensors as MNIST; training never touches files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .decode import ImageError, open_image
from .images import IMAGE_SUFFIXES, prepare_image
from .info import DatasetInfo, Splits, channel_stats

FOLDER_PREFIX = "folder:"
FOLDER_SPLIT_SEED = 0  # the train/test split of a folder never depends on --seed: every run tests on the same images


def _class_name(entry: os.DirEntry, root: Path) -> str:
    """A class folder's name, which must be valid UTF-8: it goes into checkpoints, JSON and HTTP answers."""
    if not entry.name.isprintable():  # undecodable bytes arrive as lone surrogates, which are not printable
        raise UserError(f"{root}: the class folder {entry.name.encode('utf-8', 'replace')!r} is not named in "
                        "printable UTF-8; rename it")
    return entry.name


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (sorted), ImageFolder's way (hidden entries skipped), without following
    symbolic links: a link could lead out of the data set, or loop (two links to '..' grow the walk
    exponentially). Links are skipped, folders and files alike."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(parent, d)))
        for name in sorted(files):
            path = Path(parent, name)
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and not path.is_symlink():
                found.append(path)
    return found


def _class_files(root: Path) -> dict[str, list[Path]]:
    """class name -> its image files (sorted): one sub-folder per class, as torchvision's ImageFolder."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"{root}: cannot read ({exc.strerror or exc})") from None
    classes = [e for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    if not classes:
        raise UserError(f"{root}: no class folders found; make one sub-folder per class")
    return _once_each({_class_name(e, root): _images_under(Path(e.path)) for e in classes})


def _file_id(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino  # one file, whatever its names (hard links)


def _once_each(files: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Every file once: a second name for a file already seen (a hard link) is dropped, so a random split can
    never put the same image in both train and test."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, list[Path]] = {}
    for name, paths in files.items():
        out[name] = []
        for path in paths:
            if _file_id(path) not in seen:
                seen.add(_file_id(path))
                out[name].append(path)
    return out


def _one_split_each(train: dict[str, list[Path]], test: dict[str, list[Path]], root: Path) -> None:
    """No file may be both trained and tested on."""
    seen = {_file_id(p) for paths in train.values() for p in paths}
    both = sorted(str(p) for paths in test.values() for p in paths if _file_id(p) in seen)
    if both:
        raise UserError(f"{root}: {both[0]} is also in train/ (the same file under another name); each image "
                        "must be in one split only")


def _decode(paths: list[Path], mode: str, size: int) -> np.ndarray:
    """Decode every file as RGB-or-grey at ``size``; a bad file is a UserError naming it."""
    out = []
    for path in paths:
        try:
            out.append(prepare_image(open_image(path), mode, 3 if mode == "resize" else 1, size).numpy())
        except ImageError as exc:
            raise UserError(f"{path}: {exc}; remove it or fix it") from None
    return np.stack(out) if out else np.zeros((0, 1, size, size), dtype=np.uint8)


def load_folder(root: Path, preprocess: str, image_size: int, test_fraction: float) -> Splits:
    """The images under ``root`` (one sub-folder per class, or train/ and test/ of them), decoded once."""
    if not root.is_dir():
        raise UserError(f"--dataset {FOLDER_PREFIX}{root}: no such folder")
    size = 28 if preprocess == "digit" else image_size
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = _class_files(root / "train"), _class_files(root / "test")
        _one_split_each(train_files, test_files, root)
        extra = sorted(set(test_files) - set(train_files))
        if extra:
            raise UserError(f"{root / 'test'} has classes that {root / 'train'} lacks: {', '.join(extra)}")
        fraction = 0.0
    else:
        if not 0.0 < test_fraction < 1.0:
            raise UserError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
        train_files, test_files = _split(_class_files(root), test_fraction)
        fraction = test_fraction
    classes = tuple(sorted(train_files))
    if len(classes) < 2:
        raise UserError(f"{root}: found {len(classes)} class folder(s); a classifier needs at least 2")
    empty = [c for c in classes if not train_files[c]]
    if empty:
        raise UserError(f"{root}: no training images for class(es) {', '.join(empty)} ({', '.join(IMAGE_SUFFIXES)})")

    def tensors(files: dict[str, list[Path]]) -> tuple[np.ndarray, np.ndarray]:
        paths = [p for c in classes for p in files.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in files.get(c, [])], dtype=np.int64)
        return _decode(paths, preprocess, size), labels

    (train_x, train_y), (test_x, test_y) = tensors(train_files), tensors(test_files)
    if len(test_y) == 0:
        raise UserError(f"{root}: no test images; add some to test/ or use more images per class")
    channels = 1
    if preprocess == "resize" and all((x[0] == x[1]).all() and (x[1] == x[2]).all() for x in (train_x, test_x)):
        train_x, test_x = train_x[:, :1], test_x[:, :1]  # every image is grey: one channel is enough
    else:
        channels = train_x.shape[1]
    train_t, test_t = torch.from_numpy(train_x), torch.from_numpy(test_x)
    mean, std = channel_stats(train_t)
    info = DatasetInfo(f"{FOLDER_PREFIX}{root.resolve()}", classes, mean, std, channels=channels, image_size=size,
                       preprocess=preprocess, test_fraction=fraction)
    return Splits(train_t, torch.from_numpy(train_y), test_t, torch.from_numpy(test_y), info)


def _split(files: dict[str, list[Path]], fraction: float) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class, a fixed random ``fraction`` (at least one image where a class has two or more) to test."""
    gen = torch.Generator().manual_seed(FOLDER_SPLIT_SEED)
    train, test = {}, {}
    for name, paths in files.items():
        order = torch.randperm(len(paths), generator=gen).tolist()
        n_test = min(len(paths) - 1, max(1, round(fraction * len(paths)))) if len(paths) > 1 else 0
        test[name] = sorted(paths[i] for i in order[:n_test])
        train[name] = sorted(paths[i] for i in order[n_test:])
    return train, test
