"""Choosing the compute device: CUDA, then Apple's MPS, then the CPU (the guide's order)."""

from __future__ import annotations

import functools
import os
import time

import torch

from .cpuload import CpuSample, affinity, busy_between, busy_cores, read, usable_cores
from .errors import UserError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.insert(0, "cuda")
    if _mps_available():
        found.insert(len(found) - 1, "mps")
    return found


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` -> the fastest available device; an explicit device that is not available is a UserError."""
    if requested == "auto":
        return torch.device(available_devices()[0])
    base = requested.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {requested!r}; choose auto, cpu, cuda or mps")
    if base not in available_devices():
        raise UserError(f"device {requested!r} was asked for but is not available here (available: {', '.join(available_devices())})")
    return torch.device(requested)


# oneDNN's instruction sets from AVX512_CORE_BF16 up compute bf16 natively; ONEDNN_MAX_CPU_ISA (or its old name
# DNNL_MAX_CPU_ISA) set below them, e.g. AVX2, keeps oneDNN off those units, so bf16 would be emulated
NATIVE_BF16_ISAS = {"AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                    "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL"}


# the same for AMX's tiles: on a CPU with AMX, oneDNN runs bf16 convolutions and their backward passes on them
AMX_BF16_ISAS = {"AVX10_1_512_AMX", "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL"}


def _onednn_cap() -> str:
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The first processor's flags in /proc/cpuinfo (none where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            return frozenset(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast is a real speed-up,
    unless oneDNN was told to keep below them."""
    return _onednn_cap() in NATIVE_BF16_ISAS and bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def cpu_has_amx_bf16() -> bool:
    """True where oneDNN computes bf16 on AMX tiles: a CPU with AMX-BF16, oneDNN not held below it."""
    return _onednn_cap() in AMX_BF16_ISAS and "amx_bf16" in _cpu_flags()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``auto`` uses bf16 where the hardware computes it natively (CUDA with bf16 support, AMX/AVX512-BF16 CPUs)
    and fp32 elsewhere. Weights, optimizer state and checkpoints stay fp32 either way.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "mps":
            raise UserError("--precision bf16 is not supported on mps; use fp32")
        return torch.bfloat16
    if precision != "auto":
        raise UserError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) lets oneDNN and cuDNN run convolutions and pooling without layout shuffles."""
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


def flush_denormals() -> bool:
    """Treat subnormal floats (below ~1.2e-38 in fp32) as zero on this CPU; True if the CPU supports it.

    Late in training some values (Adam's squared-gradient averages, tiny gradients) fall into the subnormal
    range, where x86 arithmetic is many times slower: without this the guide's model's epochs on a CPU slow
    from 4.8 s to 5.3 s over five epochs; with it they stay flat, and every printed loss and accuracy of
    that run came out identical. The setting is per thread and torch's intra-op worker threads copy it
    when they start, so call this before the first parallel tensor operation (``fit`` does, before it
    normalises the data; loading the files runs nothing in parallel).
    """
    return bool(torch.set_flush_denormal(True))


def threads_per_job(jobs: int = 1, sample: bool = True) -> int:
    """Torch threads for each of ``jobs`` processes about to compute here: the cores that other work leaves
    free, split evenly, at least one. ``OMP_NUM_THREADS``, when set, decides instead.

    Torch's CPU kernels slow badly when their threads outnumber the free cores: every parallel region waits
    for its slowest thread, and a thread that shares its core runs at half speed or less. On the 2-core VM,
    one epoch of the guide's CNN beside a busy process took 3x its time alone with 2 threads and 1.5x with 1
    (BENCHMARKS.md). So a core that is busy (more than half of it, measured by ``cpuload.busy_cores``: over the
    command's start-up when the ``mnist`` command marked it, else over 0.1 s) is left out.
    """
    given = _threads_from_env()
    if given:
        return given
    return max(1, (free_cores() if sample else usable_cores()) // max(1, jobs))


def _threads_from_env() -> int:
    """OMP_NUM_THREADS when it names a positive count, else 0."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else 0


def free_cores(busy: float | None = None) -> int:
    """This process's cores less those other work keeps busy (a core more than half busy counts), at least one;
    ``busy``: a reading already taken (``LoadFollower``'s), else one now (``cpuload.busy_cores``)."""
    return max(1, usable_cores() - round(busy_cores() if busy is None else busy))


def set_threads(requested: int = 0) -> int:
    """Give torch ``requested`` compute threads, or (0) the policy's: the cores other work leaves free."""
    threads = requested or threads_per_job(1)
    torch.set_num_threads(threads)
    return threads


def follows_load(requested: int) -> bool:
    """Whether the policy chose the threads (no ``--threads``, no OMP_NUM_THREADS), so it may choose again while
    a run trains (``LoadFollower``); a count the user gave stays fixed, and so does the run's rounding."""
    return not requested and not _threads_from_env()


# seconds between readings. /proc/stat counts in 10 ms ticks, so 0.5 s reads each core to 2 %; beside a spinner that
# started 3 s in, one epoch of the guide CNN took 6.61 s reading every 0.5 s, 7.17 s every 1 s, 7.47 s every 2 s
# (medians of 5, alternated; 5.29 s alone; BENCHMARKS.md): two threads beside it cost ~10x, so waiting costs most
FOLLOW_EVERY_S = 0.5


class LoadFollower:
    """Between training steps, keeps torch's threads at the cores other work leaves free, as the start-up
    policy (``threads_per_job``) chose them, when that work starts or stops after start-up.

    The start-up reading cannot see a neighbour that starts later (a second run, a notebook kernel): beside one
    that started 3 s in, two threads made one epoch of the guide's CNN 6-12x slower than alone (BENCHMARKS.md).
    Calling it costs one clock read (0.15 us); every ``every_s`` it reads /proc (0.03 ms) and sets torch's thread
    count when the answer changed. Threads only change between steps, so each step runs on one count, but the
    sums' rounding follows the count: give ``--threads`` for runs that repeat bit for bit.
    """

    def __init__(self, every_s: float = FOLLOW_EVERY_S) -> None:
        self.every_s = every_s
        self.cpus = affinity()
        self.last: CpuSample | None = read(self.cpus) if self.cpus else None  # None: nothing to follow here
        self.t0 = time.monotonic()
        self.changes: list[tuple[float, int]] = []  # (seconds after the start, threads from then on)

    def __call__(self) -> None:
        if self.last is None or time.monotonic() - self.last.at < self.every_s:
            return
        now = read(self.cpus)
        threads = free_cores(busy_between(self.last, now))  # the start-up policy's rule, on this window
        self.last = now
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes.append((round(time.monotonic() - self.t0, 1), threads))


def oversubscribed(count: int, what: str) -> str | None:
    """What to tell a user who asked for ``count`` threads or processes computing at once (``what``: the flags
    that asked, e.g. "--threads 8"), when that is more than the cores this process may use; else None. It is
    honoured all the same (an override is an override), but the extra ones only take turns on the cores, and
    every parallel step waits for the last of them: ``mnist train --epoch-fraction 0.01 --threads 1000`` on 2
    cores took 111 s, 40x its 2.7 s with 2 threads."""
    cores = usable_cores()
    if count <= cores:
        return None
    return f"{what} is more than the {cores} core{'s' * (cores > 1)} this process may use; they only take turns on them"


def available_memory() -> int | None:
    """Bytes this process could still take: MemAvailable, or less where its cgroup (a container) sets a limit;
    None where neither can be read (not Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            free = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):  # cgroup v1, or no cgroup file system: MemAvailable alone
        pass
    return free


def check_processes_fit(count: int, each: int, flag: str, noun: str, available: int | None = None) -> None:
    """Refuse ``count`` processes (``flag``, e.g. --workers) of ``each`` bytes of their own, more than one, when
    the memory available (``available_memory``, unless given) cannot hold them: one line with the most that fit."""
    available = available_memory() if available is None else available
    if available is not None and count > 1 and count * each > available:
        raise UserError(f"{flag} {count} needs about {count * each / 2**30:.1f} GiB ({each // 2**20} MiB each), and "
                        f"{available / 2**30:.1f} GiB of memory is available; choose at most "
                        f"{max(1, available // each)} {noun}")
