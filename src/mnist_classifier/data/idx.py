"""The IDX format of MNIST and its family: parsing, encoding, and reading a data set's four files.

Files may be stored plain or gzipped (``name`` or ``name.gz``); the bytes that count are the uncompressed ones.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


def find_file(folder: Path, stem: str) -> Path | None:
    """The plain file if present, else its ``.gz``."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_images(path: Path, transpose: bool = False) -> torch.Tensor:
    """An IDX file of square uint8 images ``(N, H, W)`` -> ``(N, 1, H, W)`` uint8 (EMNIST stores them transposed)."""
    arr = parse_idx(read_file_bytes(path), str(path))
    if arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[1] != arr.shape[2]:
        raise UserError(f"{path}: expected square uint8 images (N, H, W), got {arr.dtype} {list(arr.shape)}")
    x = torch.from_numpy(arr.copy()).unsqueeze(1)  # copy: frombuffer views are read-only
    return x.transpose(2, 3).contiguous() if transpose else x


def read_labels(path: Path, n_classes: int, offset: int = 0) -> torch.Tensor:
    """An IDX file of labels -> ``(N,)`` int64 in ``[0, n_classes)``; ``offset`` is subtracted first
    (EMNIST letters count from 1). QMNIST's rows of 8 numbers per image give their first, the class."""
    arr = parse_idx(read_file_bytes(path), str(path))
    if arr.ndim == 2:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise UserError(f"{path}: expected one label per image, got shape {list(arr.shape)}")
    labels = torch.from_numpy(arr.astype(np.int64)) - offset
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise UserError(f"{path}: labels must be 0-{n_classes - 1}, found {int(labels.min())}-{int(labels.max())}")
    return labels


def read_pair(images_path: Path, labels_path: Path, n_classes: int, transpose: bool = False,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One split: images ``(N, 1, H, W)`` uint8 and labels ``(N,)`` int64, checked to have the same N."""
    images = read_images(images_path, transpose)
    labels = read_labels(labels_path, n_classes, offset)
    check_counts(images, labels, images_path, labels_path)
    return images, labels


def check_counts(images: torch.Tensor, labels: torch.Tensor, images_path: Path, labels_path: Path) -> None:
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
