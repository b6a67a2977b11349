"""What a server holds while it runs: its address, claimed against a second server, and a temporary folder
with room for what the workers keep there (the ONNX export, their metric files). Each is given back when
the server stops, and the kernel takes back the claim even from a server killed outright. The folder of a
server killed outright (SIGKILL, the OOM killer) cannot remove itself; the next server started with the same
temporary folder removes it, once no process of the old server holds its lock."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Iterator

from .. import fileio
from ..errors import UserError

METRICS_ROOM = 2**20  # bytes of free space per worker for its metric files: 4 x 64 KiB, and its restarts'
# bytes of memory a worker keeps to itself: 321 MB of private pages (smaps_rollup's Private_Dirty) measured in
# each of a --workers 2 server's workers (onnxruntime, the guide CNN, CPU-7, 2026-12-07), with a margin
WORKER_MEMORY = 400 * 2**20


def can_reuse_port(workers: int) -> bool:
    return workers > 1 and hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


@contextlib.contextmanager
def port_claim(address: tuple[str, int], workers: int) -> Iterator[None]:
    """Hold ``address`` (the bound IP and port) for this server alone while the block runs.

    Several workers share the port through SO_REUSEPORT, which lets any process of the same user join: a second
    ``mnist serve --workers 2`` on the same port started without a word and took a share of the connections
    (seen: 12 requests spread over the 4 workers of two servers), so a server left running by mistake kept
    answering part of the traffic with its own model. The claim is a name in Linux's abstract socket
    namespace (per network namespace, like ports), which the kernel frees when the process ends, even by
    SIGKILL. Where the port is not shared (one worker, or no SO_REUSEPORT) the port itself is exclusive."""
    if not can_reuse_port(workers):
        yield
        return
    host, port = address
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0mnist-serve-{host}-{port}")
    except OSError as exc:
        claim.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} is already served by another mnist serve; stop it first or choose "
                            "another --port") from None
        claim = None  # no abstract sockets here (a sandbox): serve unclaimed, as before
    try:
        yield
    finally:
        if claim is not None:
            claim.close()


try:
    import fcntl  # POSIX only: without it (Windows) folders are not locked, and none is ever swept
except ImportError:
    fcntl = None

PREFIX = "mnist-serve-"
IN_USE = ".in-use"  # in a server's folder: each of its processes holds a shared flock on it while it runs


def hold(folder: Path) -> int:
    """A shared lock on ``folder``'s IN_USE file, held until the returned descriptor is closed (or the process
    ends, however it ends: the kernel releases it). Workers take one too, so a folder is never removed while a
    worker whose supervisor was killed is still draining."""
    fd = os.open(folder / IN_USE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # OSError: there is none
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def remove_abandoned(root: Path) -> list[Path]:
    """Remove the servers' folders in ``root`` that no process holds: this user's ``mnist-serve-*`` folders
    whose IN_USE lock can be taken exclusively. A folder without one (being made, or an older version's) is
    left alone. Returns the folders removed."""
    removed = []
    for folder in root.glob(f"{PREFIX}*") if fcntl else []:
        with contextlib.suppress(OSError):
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            fd = os.open(folder / IN_USE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live server's
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            finally:
                os.close(fd)
    return removed


@contextlib.contextmanager
def scratch_folder() -> Iterator[str]:
    """The server's temporary folder (the ONNX export, the workers' metric files), removed when it stops; the
    folders of servers killed outright are removed first."""
    root = Path(tempfile.gettempdir())
    remove_abandoned(root)
    try:
        folder = tempfile.TemporaryDirectory(prefix=PREFIX)
    except OSError as exc:  # TMPDIR full, read-only, or none of tempfile's candidates usable
        raise UserError(f"cannot create a temporary folder in {root}: {exc.strerror or exc}; "
                        "set TMPDIR to a folder with room") from None
    fd = _locked(Path(folder.name))
    try:
        with folder as tmp:
            yield tmp
    finally:
        if fd is not None:
            os.close(fd)  # after the folder is gone: a sweep cannot take it while it is being removed


def _locked(folder: Path) -> int | None:
    """``folder``'s IN_USE file, made with a shared lock on it: the lock is taken before the file has its name,
    so a sweep never finds it free. None where the file system cannot lock (the folder is then never swept)."""
    if fcntl is None:
        return None
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(name, folder / IN_USE)
        return fd
    except OSError:
        os.close(fd)
        return None


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the process that removes the workers' semaphores if they die)
    deaf to SIGHUP: it ignores SIGINT and SIGTERM itself, but a closed terminal's SIGHUP killed it, and the
    server printed a traceback per semaphore on its way out. An ignored signal stays ignored across exec."""
    if not hasattr(signal, "SIGHUP"):  # Windows: no such signal, and no tracker process
        return
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


def metrics_folder(tmp: Path, workers: int) -> Path:
    """The folder where the workers' prometheus_client files go, with room for them.

    Each worker maps 4 files of 64 KiB there (counters, histograms, two gauges; sparse, filled as values
    come) and a restarted worker adds new ones. A worker that touches a page of a file the file system has
    no room for is killed by SIGBUS, before it could log why, so the room is checked first."""
    folder = fileio.make_dir(tmp / "metrics", "metrics folder")
    free, need = shutil.disk_usage(folder).free, workers * METRICS_ROOM
    if free < need:
        raise UserError(f"the temporary folder {tmp.parent} has {free // 1024:,} KiB free, and {workers} workers' "
                        f"metric files need {need // 1024:,} KiB there; free some space or set TMPDIR elsewhere")
    return folder
