"""Worker processes that stop when the process that started them is gone.

A parent killed outright (SIGKILL, the OOM killer) cannot stop its children. Before 2026-12-05 a server's
workers then served on, unwatched, and shared the port (SO_REUSEPORT) with the next server started on it; a
sweep's workers trained on through the remaining trials. Each child now polls its parent's pid and, once it
has changed (the child was adopted), sends itself SIGTERM: the stop each already handles as its parent's own
(a server worker drains, a sweep trial saves its place and is queued again). Polling ``getppid()`` works on
every POSIX system; Linux's ``PR_SET_PDEATHSIG`` alone would not.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.5  # seconds between two looks at the parent's pid (one getppid() call each)


def follow_parent(parent: int, every: float = POLL_S) -> threading.Thread:
    """Start a daemon thread that sends this process SIGTERM once ``parent`` (a pid) is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="follow-parent", daemon=True)
    thread.start()
    return thread
