"""How many of this process's CPU cores other work keeps busy, read from /proc (Linux); no torch import.

The thread policy (``device.threads_per_job``) needs the answer at start-up. Sampling it costs a wait:
two readings of /proc/stat some time apart. The ``mnist`` command takes its first reading (``mark_start``)
before it imports torch, so the import's 1-2 s are the measuring window and the policy waits for nothing.
This process's own CPU time over the window (/proc/self/stat) is taken out: the import keeps one core busy
itself, and that is not other work. While a run trains (``mnist train``, a sweep's trial),
``device.LoadFollower`` reads it again every 0.5 s between steps (``busy_between`` two readings), so work that
starts later is seen too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

MIN_WINDOW_S = 0.1  # shortest measuring window; /proc counts in ticks of 10 ms (USER_HZ = 100)


@dataclass(frozen=True)
class CpuSample:
    """One reading: jiffies (ticks) summed over ``cpus`` since boot, and this process's own."""

    at: float  # time.monotonic(), s
    cpus: frozenset[int]
    idle: int  # idle + iowait
    total: int  # every state, steal included
    own: int  # this process's user + system time, all its threads


_start: CpuSample | None = None  # mark_start's reading, used once by the first busy_cores call


def affinity() -> frozenset[int]:
    """The cores this process may run on (its affinity mask: what a container or taskset allows); empty
    where the system has no affinity mask (macOS, Windows)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:
        return frozenset()


def usable_cores() -> int:
    """CPU cores this process may run on; ``os.cpu_count()`` where there is no affinity mask."""
    return len(affinity()) or os.cpu_count() or 1


def read(cpus: frozenset[int]) -> CpuSample | None:
    """A reading over ``cpus`` now, or None where /proc is missing, unreadable or laid out otherwise."""
    try:
        with open("/proc/stat") as f:
            stat = f.read()
        with open("/proc/self/stat") as f:
            own_stat = f.read()
    except OSError:
        return None
    ticks = parse(stat, own_stat, cpus)
    return None if ticks is None else CpuSample(time.monotonic(), cpus, *ticks)


def parse(stat: str, own_stat: str, cpus: frozenset[int]) -> tuple[int, int, int] | None:
    """(idle, total, own) jiffies from the texts of /proc/stat and /proc/self/stat; None for another layout."""
    idle = total = 0
    try:
        for line in stat.splitlines():
            name, _, rest = line.partition(" ")
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(f) for f in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
                idle += ticks[3] + ticks[4]
                total += sum(ticks)
        own_fields = own_stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
        own = int(own_fields[11]) + int(own_fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    except (IndexError, ValueError):
        return None
    return idle, total, own


def mark_start() -> None:
    """Take the first reading now (before a long import), for the next ``busy_cores`` call."""
    global _start
    _start = read(affinity())


def busy_cores(interval: float = MIN_WINDOW_S) -> float:
    """How many of this process's cores other work keeps busy (0 where the system does not say).

    The window runs from ``mark_start`` when it was called and not yet used, else from now; it lasts at
    least ``interval`` seconds, waiting for the rest. This process's own CPU time is not counted.
    """
    global _start
    cpus = affinity()
    before, _start = _start, None
    if not cpus:
        return 0.0
    if before is None or before.cpus != cpus:  # no mark, or the affinity changed since: a fresh window
        before = read(cpus)
    if before is None:
        return 0.0
    time.sleep(max(0.0, interval - (time.monotonic() - before.at)))
    return busy_between(before, read(cpus))


def busy_between(before: CpuSample, after: CpuSample | None) -> float:
    """How many of ``before.cpus`` other work kept busy from one reading to the next (0 where they say
    nothing): their busy ticks less this process's own, over the ticks that passed."""
    if after is None or after.total <= before.total:
        return 0.0
    others = (after.total - after.idle) - (before.total - before.idle) - (after.own - before.own)
    return len(before.cpus) * max(0, others) / (after.total - before.total)
