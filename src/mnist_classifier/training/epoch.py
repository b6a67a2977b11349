"""One pass over the training set: batches are slices of one permutation, each trained by a ``TrainStep``."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from ..errors import DivergedError
from ..terminal import heeded_hangup, leave_hung_up_terminal
from .optim import EMA
from .step import TrainStep

OnStep = Callable[[int, int, int, "float | None"], None]  # (epoch, batch, batches, mean loss or None)


@dataclass
class Progress:
    """How far an epoch got: what a Ctrl-C saves in last.pt and a resume picks up from."""

    batches_done: int = 0
    loss_sum: float = 0.0  # summed per-image loss of those batches
    seen: int = 0  # images in those batches (this process's share)
    aug_rng: torch.Tensor | None = None  # the augmentation generator's state after them (None without --augment)

    def to_payload(self) -> dict:
        return {"batches_done": self.batches_done, "loss_sum": self.loss_sum, "seen": self.seen,
                "aug_rng": self.aug_rng if self.aug_rng is not None else torch.zeros(0, dtype=torch.uint8)}

    def share(self, world: int) -> "Progress":
        """One process's part of this progress when ``world`` processes resume it. A stop under torchrun saves
        every process's sums, and each process had trained on an equal share of every batch (the global batch
        splits evenly), so each resumes with 1/world of them; one process resumes them whole."""
        if world == 1:
            return self
        return Progress(self.batches_done, self.loss_sum / world, self.seen // world, self.aug_rng)

    @classmethod
    def from_payload(cls, d: dict) -> "Progress":
        aug = d.get("aug_rng")
        return cls(int(d["batches_done"]), float(d["loss_sum"]), int(d["seen"]),
                   aug if isinstance(aug, torch.Tensor) and aug.numel() else None)


class StopRequested(Exception):
    """Training stopped cleanly after a complete step, at the user's request (Ctrl-C)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(f"stopped after {progress.batches_done} batches")
        self.progress = progress
        self.seconds = 0.0  # time the epoch had trained, filled in by whoever timed it


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in ``epoch`` (1-based): the shuffle and the augmentation depend only on
    (seed, epoch), so a resumed run replays them exactly."""
    return seed * 1_000_003 + epoch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of ``n`` images for ``epoch`` (1-based)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def count_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size  # the last, smaller batch is kept, as DataLoader does


@dataclass
class EpochLoop:
    """The parts of an epoch that stay the same all run long; ``run`` trains one epoch."""

    step: TrainStep
    batch_size: int
    n_batches: int
    lr_at: Callable[[int], float] | None = None  # global step -> learning rate (None: leave it)
    ema: EMA | None = None
    log_every: int = 100  # batches between loss read-backs (each one syncs with the device)
    on_step: OnStep | None = None
    stop_requested: Callable[[], bool] | None = None  # checked after every complete step (Ctrl-C)
    shard: tuple[int, int] = (0, 1)  # (rank, world size): this process trains on every world-th image of a batch
    aug_gen: torch.Generator | None = None  # the augmentation's random stream (None without --augment)
    seed: int = 0  # the run's --seed: the augmentation is reseeded from (seed, epoch) at every epoch's start
    stem: tuple[nn.Parameter, ...] = ()  # --stem-fraction: the model's stem (models/stem.py), while it still trains
    freeze_at: int = 0  # the global step (0-based) from which ``stem`` is frozen

    def run(self, epoch: int, perm: torch.Tensor, start: Progress | None = None) -> float:
        """Train on the batches of ``perm`` (N,) from ``start``; return the epoch's mean training loss.

        ``on_step`` gets the mean loss since the last report every ``log_every`` batches (and on the last),
        None otherwise, so the loss is only read back from the device that often.
        """
        start = start or Progress()
        self._seed_augmentation(epoch, start)
        rank, world = self.shard
        device = self.step.train_x.device
        running = torch.zeros((), device=device)  # summed batch losses since the last report
        total = torch.full((), start.loss_sum, device=device)  # summed per-image loss over the epoch
        seen, since = start.seen, 0
        for b in range(start.batches_done, self.n_batches):
            idx = perm[b * self.batch_size : (b + 1) * self.batch_size][rank::world]
            step_no = (epoch - 1) * self.n_batches + b
            self._freeze_stem(step_no)
            loss = self.step(idx, self.lr_at(step_no) if self.lr_at else None)
            if self.ema is not None:
                self.ema.update(self.step.model)
            running += loss
            total += loss * len(idx)
            seen, since = seen + len(idx), since + 1
            mean_loss = None
            if b % self.log_every == 0 or b == self.n_batches - 1:
                mean_loss = self._report(running, since, epoch, b)
                since = 0
            if self.on_step is not None:
                self.on_step(epoch, b, self.n_batches, mean_loss)
            if self.stop_requested is not None and self.stop_requested() and b < self.n_batches - 1:
                aug_rng = self.aug_gen.get_state() if self.aug_gen is not None else None
                raise StopRequested(Progress(b + 1, total.item(), seen, aug_rng))
        return total.item() / seen

    def _freeze_stem(self, step_no: int) -> None:
        """Freeze the stem before the step ``freeze_at``, or before the first step of a resumed run past it."""
        if self.stem and step_no >= self.freeze_at:
            self.step.freeze(self.stem)
            self.stem = ()

    def _seed_augmentation(self, epoch: int, start: Progress) -> None:
        if self.aug_gen is None:
            return
        if start.aug_rng is not None:  # inside an epoch: the stream where the Ctrl-C left it
            self.aug_gen.set_state(start.aug_rng.to(self.aug_gen.get_state().device))
        else:
            self.aug_gen.manual_seed(epoch_seed(self.seed, epoch))

    @staticmethod
    def _report(running: torch.Tensor, since: int, epoch: int, batch: int) -> float:
        mean_loss = (running / since).item()
        if not math.isfinite(mean_loss):
            raise DivergedError(f"loss became {mean_loss} at epoch {epoch}, batch {batch}; lower the learning rate "
                                f"(the guide's advice for a NaN loss, e.g. divide --lr by 10)")
        running.zero_()
        return mean_loss


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, train_x: torch.Tensor, train_y: torch.Tensor,
    perm: torch.Tensor, batch_size: int, epoch: int = 1, on_step: OnStep | None = None,
) -> float:
    """The guide's ``train(epoch)``: one pass over ``train_x`` (N, C, H, W) in the order ``perm``, plain steps
    in fp32; returns the mean training loss. ``fit`` uses the same ``EpochLoop`` with its options on."""
    model.train()
    loop = EpochLoop(TrainStep(model, optimizer, train_x, train_y), batch_size, count_batches(len(perm), batch_size),
                     on_step=on_step)
    return loop.run(epoch, perm)


class StopFlag:
    """Turns the first Ctrl-C (SIGINT), SIGTERM (a scheduler's preemption, `timeout`, `docker stop`) or SIGHUP
    (the terminal closed) into a request to stop after the current step, so the saved state is consistent; a
    second Ctrl-C or SIGTERM stops at once. A second SIGHUP does not: a closed terminal's job gets it twice, from
    its shell and from the kernel. Nor does any second signal on a torchrun rank (``forwarded``): torchrun passes
    on the signal it gets, so a Ctrl-C in the terminal reaches every rank twice, and torchrun itself kills the
    ranks that have not stopped after its shutdown timeout (30 s); a rank that stopped stays deaf to them until
    it exits (``uninstall``). Only in the main thread. A signal this process was started ignoring stays
    ignored, as Python leaves an ignored SIGINT: a shell starts background jobs (``mnist sweep ... &``) with
    SIGINT ignored, and ``nohup`` starts a command with SIGHUP ignored. (Before
    2026-12-05 a sweep worker inside a trial heeded an ignored SIGINT, so one trial stopped while the sweep
    went on.)"""

    active: ClassVar[StopFlag | None] = None  # the flag whose handlers are in place in this process

    def __init__(self, install: bool = True, forwarded: bool = False) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._second = self.heeded()  # each signal heeded, with the handler it gets once a stop was requested
        self._forwarded = forwarded
        if forwarded:  # a repeat is torchrun passing the signal on, not a second request
            self._second = {sig: _left_terminal if handler is _left_terminal else signal.SIG_IGN
                            for sig, handler in self._second.items()}
        if install and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._second}
            StopFlag.active = self

    @staticmethod
    def heeded() -> dict[int, object]:
        """Each signal this process heeds, with its handler once a stop was requested."""
        second = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        if (hangup := heeded_hangup()) is not None:
            second[hangup] = _left_terminal
        return {sig: handler for sig, handler in second.items() if signal.getsignal(sig) is not signal.SIG_IGN}

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.signum = signum
        for sig in self._previous:
            signal.signal(sig, self._second[sig])
        if signum == getattr(signal, "SIGHUP", None):
            leave_hung_up_terminal()  # or the next progress line raises EIO and the step's work is lost

    def request(self, signum: int) -> None:
        """A stop after the current step, as if ``signum`` had come: for a cause that is no signal here, the
        output's reader leaving (SIGPIPE, which Python ignores and raises as BrokenPipeError instead)."""
        self._handle(signum, None)

    def is_set(self) -> bool:
        return self.signum is not None

    def join(self, signum: int) -> None:
        """Stop with ``signum``, the signal the processes of a torchrun job agreed on (the largest that came),
        so that all exit with one status; a process that got no signal keeps its handlers as they are."""
        self.signum = max(self.signum or 0, signum)

    def exit_status(self) -> int:
        """128 + the signal received, as a shell reports a command a signal stopped (130 for Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)

    def uninstall(self) -> None:
        # A torchrun rank that stopped keeps deaf to the repeats on its way out: once one rank has exited,
        # torchrun sends SIGTERM to those still tearing down, which would die of it (-15), not exit as agreed.
        leaving = self._forwarded and self.is_set()
        for sig, previous in self._previous.items():
            signal.signal(sig, self._second[sig] if leaving else previous)
        self._previous = {}
        if StopFlag.active is self:
            StopFlag.active = None


@contextlib.contextmanager
def stop_requests(install: bool = True, forwarded: bool = False) -> Iterator[StopFlag]:
    """The stop flag for a block: the one already in place, else a new one for the block. A sweep's worker holds
    one from its first trial to its last, so that a signal that comes between two trials' training (the next
    point taken, its run folder made) stops the trial at its first step instead of killing the worker with the
    point left running. ``forwarded``: on a torchrun rank (``StopFlag``)."""
    if StopFlag.active is not None:
        yield StopFlag.active
        return
    flag = StopFlag(install, forwarded)
    try:
        yield flag
    finally:
        flag.uninstall()


def request_stop(signum: int) -> bool:
    """Ask the training in progress in this process to stop after its step, as if ``signum`` had come; False
    where no stop flag is in place (before the epochs start)."""
    if StopFlag.active is None:
        return False
    StopFlag.active.request(signum)
    return True


def _left_terminal(_signum, _frame) -> None:  # noqa: ANN001 - signal handler signature
    leave_hung_up_terminal()
