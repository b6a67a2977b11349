"""Atomic file writes (write to a temporary name in the same folder, fsync, then rename), and bounded JSON reads.

A rename within one filesystem is atomic, so a reader (or a run killed mid-write) sees either the old
file or the new one, never half of one. A write the system refuses (a folder that cannot be made, a full
disk, a target that is a folder) is a ``UserError`` naming the file, shown as one line by the command.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CannotWrite, UserError


def user_cache(part: str) -> Path:
    """The tool's folder ``part`` in the user's cache: $XDG_CACHE_HOME (else ~/.cache)/mnist-classifier/part.
    ``Path.home()`` raises RuntimeError where no home folder is known; callers that can go on without a cache
    catch it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-classifier" / part


def _file_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes 0600, which hides runs from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on failure removed."""
    path = Path(path)
    _refuse_special(path)
    tmp_path = _temporary_beside(path)
    try:
        os.chmod(tmp_path, _FILE_MODE)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:  # ENOSPC mid-write, or ``path`` is a folder: the old file, if any, is untouched
        raise _cannot("write", path, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (a folder, or a lock file made if missing) while the block runs;
    yields True once held, or with ``wait=False`` False at once when another process holds it. The kernel
    drops it when the process ends, even by SIGKILL. Without flock (Windows, some network file systems) it
    yields True: one process at a time is then the user's care."""
    try:
        import fcntl  # POSIX only
    except ImportError:
        yield True
        return
    path = Path(path)
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without flock (some network mounts: ENOLCK): unguarded, as without fcntl
            pass
        yield True
    finally:
        os.close(fd)  # releases the lock


def make_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """``mkdir -p path``; a refusal (not a folder, no such file system, read-only) is a one-line UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot("create the " + what, path, exc) from None
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse now, in one line, a ``path`` that could not be written later: a folder in its place, a file where
    a folder must be, a folder that cannot be written. For outputs written only after the work (lr-find's plot,
    an export), so a typo does not cost the search first. Creates nothing that stays: where the folder exists,
    one empty file is made there and removed; where it does not, the nearest folder above must be writable."""
    path = Path(path)
    if path.is_dir():
        raise CannotWrite(f"cannot write {path}: Is a directory")
    _refuse_special(path)
    parent = path.absolute().parent
    nearest = next(p for p in (parent, *parent.parents) if p.exists())  # "/" at worst
    if nearest != parent:  # folders to make later: the nearest existing one must be a folder we may write in
        if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
            code = errno.EACCES if nearest.is_dir() else errno.ENOTDIR
            raise CannotWrite(f"cannot create the folder {path.parent}: {os.strerror(code)}")
    elif not parent.is_dir():
        raise CannotWrite(f"cannot write {path}: {os.strerror(errno.ENOTDIR)}")
    else:
        _temporary_beside(path).unlink()  # the real test: permissions, a read-only file system, no inodes left
    return path


def _refuse_special(path: Path) -> None:
    """Refuse a ``path`` that is (or links to) a device, FIFO or socket: the rename would put a regular file in its
    place, and as root ``--out /dev/null`` replaced the system's /dev/null. A folder is left to the rename, whose
    "Is a directory" says it; a missing path or an unreadable folder above it is left to the write."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CannotWrite(f"cannot write {path}: not a regular file (a device, FIFO or socket)")


def _temporary_beside(path: Path) -> Path:
    """A new empty file ``.NAME.XXXX.tmp`` in ``path``'s folder (made if need be), or a one-line CannotWrite."""
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot("write", path, exc) from None
    os.close(fd)
    return Path(tmp)


def _cannot(action: str, path: Path, exc: OSError) -> UserError:
    kind = UserError if action == "read" else CannotWrite
    return kind(f"cannot {action} {path}: {exc.strerror or exc}")


MAX_JSON_BYTES = 16 * 2**20  # the JSON files the tool writes (configs, summaries, sweeps) are kilobytes


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, read up to ``limit`` bytes: a file that cannot be read, is larger, or is not
    JSON is a one-line UserError naming it (a damaged or foreign file, never a traceback or a memory blow-up)."""
    path = Path(path)
    try:  # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, for ever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{path} is not a regular file (a device, FIFO or socket)")
            data = fh.read(limit + 1)
    except OSError as exc:
        raise _cannot("read", path, exc) from None
    if len(data) > limit:
        raise UserError(f"{path} is larger than {limit:,} bytes")
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"{path} is not valid JSON ({exc})") from None


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write all rows at once (the file is small), so a crash never leaves a partial CSV."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    # Serialised in memory first (a checkpoint is MBs): torch.save's own file writer reports a full disk as a
    # RuntimeError from C++, a plain write as the OSError that atomic_path turns into a one-line error.
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` fill a temporary path (matplotlib, onnx, ...), then rename it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
