"""Output that goes away: a terminal hung up (SIGHUP), a pipe whose reader left, and the writes that fail after.

An ssh session that dies or a terminal window that is closed hangs its terminal up. The kernel sends SIGHUP
to the terminal's session leader (a shell passes it on to its jobs; when the shell then exits, the kernel
sends it to the job that was in the foreground once more), and from then on every write to the terminal fails
with EIO (errno 5). SIGHUP's default action kills the process at once; a process that handles it instead must
also stop writing to the terminal, or its next progress line raises. ``nohup`` starts a program with SIGHUP
ignored so that it outlives its terminal, and that choice is kept: the handlers here are for the others.

A pipe whose reader left (``mnist train | head``) fails each write with EPIPE, which Python raises as
BrokenPipeError (it ignores SIGPIPE, whose default action would kill the process).
"""

from __future__ import annotations

import os
import signal
import stat


def heeded_hangup() -> int | None:
    """SIGHUP, where the system has it and this process was not started ignoring it (``nohup``; children
    inherit the ignored signal); else None."""
    sig = getattr(signal, "SIGHUP", None)  # not on Windows
    return None if sig is None or signal.getsignal(sig) is signal.SIG_IGN else sig


def leave_hung_up_terminal() -> list[int]:
    """Point standard output and error at /dev/null where they are a terminal that was hung up, so that what
    the process still prints on its way out is dropped instead of raising; returns the file descriptors moved.

    A hung-up terminal is a character device that is no longer a terminal: ``isatty`` asks the driver for its
    settings, which fails once it is hung up. A live terminal (a SIGHUP sent with ``kill``) and a file or pipe
    are left as they are; /dev/null itself, the other such device, is harmlessly pointed at itself."""
    moved = [fd for fd in (1, 2) if _hung_up(fd)]
    if moved:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in moved:
                os.dup2(null, fd)
        finally:
            os.close(null)
    return moved


def leave_broken_pipe(fd: int) -> None:
    """Point ``fd`` at /dev/null after a write to it failed with EPIPE, so that what is still printed to it (the
    rest of the run, the interpreter's flush at exit) is dropped instead of raising again."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _hung_up(fd: int) -> bool:
    try:
        return stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd)
    except OSError:  # closed
        return False
