"""C++ kernels, built on first use by the system's compiler for this CPU and cached, loaded through ctypes.

``load(source)`` compiles a ``.cpp`` file of the package into a shared library under
``$XDG_CACHE_HOME/mnist-classifier/native`` (``~/.cache/...``) and returns it, or None where it cannot: no
compiler, a failed build, or ``MNIST_NATIVE=0``. ``why_not(source)`` then says why. Callers keep torch's
own path for that case, so a machine without a compiler runs the same code, only slower.

The library's name is a hash of everything it depends on: the source and the headers beside it, the flags,
the compiler and this CPU (``-march=native`` code must not run on another CPU that shares the home folder);
``MNIST_NATIVE_ARCH`` names another instruction set to build for. A build is written beside its final name and
renamed into place, so two processes building at once, or a build killed midway, never leave a half-written
library to load. A killed build's temporary file is removed by the next build into the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from . import fileio
from .errors import UserError

FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BUILD_SECONDS = 120  # a kernel file builds in ~1 s; a compiler that hangs is given up on
STALE_SECONDS = 2 * BUILD_SECONDS  # a build's temporary file older than this has no builder left
DISABLE = "MNIST_NATIVE"  # MNIST_NATIVE=0: never build or load, torch's own kernels everywhere
# MNIST_NATIVE_ARCH=x86-64-v3: build for that instruction set (here AVX2 and FMA) instead of this CPU's own, as
# for a cache folder shared with older CPUs, or to run the kernels as such a CPU would (tests, benchmarks)
ARCH = "MNIST_NATIVE_ARCH"


def flags() -> tuple[str, ...]:
    return (*FLAGS, f"-march={os.environ.get(ARCH) or 'native'}")


def cache_dir() -> Path:
    return fileio.user_cache("native")


def compiler() -> str | None:
    """The C++ compiler: $CXX, else c++ or g++ on the PATH."""
    named = os.environ.get("CXX")
    return shutil.which(named) if named else shutil.which("c++") or shutil.which("g++")


def cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and instruction-set flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("vendor_id", "model name", "flags", "Features", "CPU part")
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(lines) or platform.machine()


def library_path(source: Path, cxx: str) -> Path:
    key = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # what the source may #include "..."
        key.update(b"\0" + header.read_bytes())
    for part in (" ".join(flags()), cxx, cpu_identity()):
        key.update(b"\0" + part.encode())
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:24]}.so"


class BuildFailed(Exception):
    pass


def build(source: Path, target: Path, cxx: str) -> None:
    """Compile ``source`` into ``target`` (written beside it, then renamed): BuildFailed with the compiler's
    last line if it fails."""
    def compile_into(tmp: Path) -> None:
        try:
            proc = subprocess.run([cxx, *flags(), "-o", str(tmp), str(source)], capture_output=True, text=True,
                                  timeout=BUILD_SECONDS)
        except subprocess.TimeoutExpired:
            raise BuildFailed(f"{cxx} took over {BUILD_SECONDS} s") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise BuildFailed(f"{cxx} failed: {last}")

    remove_stale_builds(target.parent)
    fileio.write_with(target, compile_into)


def remove_stale_builds(folder: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.so.XXXX.tmp``) of builds killed midway: a build in flight is given up
    after BUILD_SECONDS, so a file untouched for STALE_SECONDS is no other process's. Returns those removed."""
    cutoff = time.time() - STALE_SECONDS
    removed = []
    for tmp in folder.glob(".*.so.*.tmp"):
        with contextlib.suppress(OSError):  # gone already: another process's sweep, or its rename
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed.append(tmp)
    return removed


@functools.cache
def _load(source: Path) -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(DISABLE, "1") == "0":
        return None, f"{DISABLE}=0"
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler (c++, g++ or $CXX) on the PATH"
    try:
        target = library_path(source, cxx)  # reads the source; RuntimeError: no home folder to cache in
        if not target.exists():
            build(source, target, cxx)
        return ctypes.CDLL(str(target)), None
    except (BuildFailed, UserError, OSError, RuntimeError) as exc:  # UserError: the cache cannot be written
        return None, str(exc)


def load(source: Path) -> ctypes.CDLL | None:
    """The library built from ``source`` for this CPU, built now if not cached; None if it cannot be."""
    return _load(source)[0]


def function(source: Path, symbol: str, argtypes: list) -> ctypes._CFuncPtr | None:
    """``symbol`` from the library built from ``source``, its argument types declared (once per process); None
    if the library cannot be built."""
    lib = load(source)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    if fn.argtypes is None:
        fn.argtypes = argtypes
    return fn


def why_not(source: Path) -> str | None:
    """Why ``load(source)`` gives None (None if it loads)."""
    return _load(source)[1]
