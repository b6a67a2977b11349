"""``fit``: train a model and write its run folder. The whole loop reads top to bottom:

    session = build_session(...)           # data on the device, model, optimizer, EMA, resume
    for epoch in ...:
        train_loss, seconds = train_one_epoch(...)    # batches of one permutation, one step each
        calibrate(...)                                # batch norm's statistics for the weights as they are
        row = score_epoch(...)                        # fp32 accuracy on the validation (or test) set
        save the epoch                                # metrics.csv, model.pt, last.pt
    return finish(...)                     # the validation-chosen model's test score, summary.json

It never prints: progress goes to a ``Reporter`` the caller supplies.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import fileio
from ..config import TrainConfig
from ..data import Splits, check_name
from ..device import LoadFollower, flush_denormals, preferred_memory_format
from ..errors import DivergedError, Interrupted, UserError
from ..evaluation import evaluate_model, final_drop
from ..models import build_model, check_model
from ..models.registry import SELF_NORMALISING
from ..models import checkpoint
from .. import runs
from .distributed import SINGLE, DistContext, MaxVote, check_batch, same_on_all_ranks
from .epoch import OnStep, Progress, StopFlag, StopRequested, epoch_permutation, stop_requests
from .optim import lr_value
from .precise_bn import recalibrate, sample_batches
from .session import Learner, RunSpec, Session, build_session
from .state import RunFiles
from .tracking import TensorBoardLog, WithLog


class Reporter:
    """Receives progress from ``fit``. The default ignores everything; the CLI prints."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        """Called after every optimizer step; ``loss`` (mean since the last report) only every ``log_every`` batches."""

    def epoch(self, row: dict[str, Any]) -> None: ...


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The names only the registries know: the data set and the model (every field's own value was checked
    when the TrainConfig was built)."""
    check_name(cfg.dataset)
    name = check_model(cfg.model)
    if (cfg.pretrained or cfg.input_size) and name not in SELF_NORMALISING:
        raise UserError(f"--pretrained and --input-size are for {', '.join(sorted(SELF_NORMALISING))}, not {cfg.model}")
    if cfg.whiten_init and cfg.pretrained:
        raise UserError("--whiten-init would overwrite the pretrained first layer; use one or the other")
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _precision(spec: RunSpec) -> str:
    return str(spec.amp_dtype).removeprefix("torch.") if spec.amp_dtype else "fp32"


def write_config(spec: RunSpec, run_dir: Path) -> None:
    fileio.write_json(run_dir / "config.json", {
        "train": spec.cfg.to_dict(), "model": spec.mcfg.to_dict(), "dataset": spec.info.to_dict(),
        "device": str(spec.device), "autocast": _precision(spec), "world_size": spec.ctx.world_size,
        "environment": runs.environment(),
    })


def start_info(s: Session, run_dir: Path) -> dict[str, Any]:
    spec = s.spec
    return {"device": str(spec.device), "precision": _precision(spec), "params": s.learner.params,
            "n_train": len(s.data.train_y), "n_test": len(s.data.eval_y), "split": spec.split,
            "n_batches": s.learner.loop.n_batches, "start_epoch": s.state.epoch + 1, "epochs": spec.cfg.epochs,
            "run_dir": str(run_dir), "world_size": spec.ctx.world_size}


def evaluate_sharded(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                     ctx: DistContext, confusion: bool = False) -> dict[str, Any]:
    """fp32 loss and accuracy over all of ``images``: each process scores its every world-th image and the
    sums are added up across processes (a single process scores them all)."""
    return evaluate_model(model, ctx.shard(images), ctx.shard(labels), batch_size, reduce=ctx.all_reduce_sum,
                          confusion=confusion)


def train_one_epoch(learner: Learner, spec: RunSpec, epoch: int, perm: torch.Tensor,
                    start: Progress | None) -> tuple[float, float]:
    """Train one epoch in the order ``perm`` (from ``start`` inside it, after a Ctrl-C); return (mean training
    loss, seconds). A Ctrl-C raises ``StopRequested`` with the seconds this epoch had trained."""
    learner.train_model.train()
    _sync(spec.device)
    t0 = time.perf_counter()
    try:
        train_loss = learner.loop.run(epoch, perm, start)
    except StopRequested as halt:
        halt.seconds = time.perf_counter() - t0
        raise
    _sync(spec.device)
    seconds = time.perf_counter() - t0
    if spec.ctx.enabled:  # the mean over all processes' images
        pair = torch.tensor([train_loss * learner.local_count, learner.local_count], dtype=torch.float64,
                            device=spec.device)
        pair = spec.ctx.all_reduce_sum(pair)
        train_loss = (pair[0] / pair[1]).item()
    return train_loss, seconds


def calibrate(s: Session, perm: torch.Tensor) -> float:
    """Precise batch norm before the epoch is scored and saved: the scored model's running statistics are
    recomputed from the first ``--precise-bn`` images of this epoch's shuffle ``perm`` (unaugmented), pooled over
    processes. Every epoch, so each metrics.csv row, the validation choice and the model kept all use
    statistics that belong to their weights. The weights themselves are not touched. Returns its seconds."""
    spec, n = s.spec, s.spec.cfg.precise_bn
    if not n:
        return 0.0
    ctx = spec.ctx
    _sync(spec.device)
    t0 = time.perf_counter()
    batches = sample_batches(s.data.train_x, ctx.shard(perm[:n]), max(2, spec.cfg.batch_size // ctx.world_size))
    recalibrate(s.learner.scored, batches, reduce=ctx.all_reduce_sum if ctx.enabled else None)
    _sync(spec.device)
    return time.perf_counter() - t0


def score_epoch(s: Session, epoch: int, train_loss: float, seconds: float) -> dict[str, Any]:
    """The metrics.csv row of an epoch: the scored weights on the evaluation split."""
    spec, split = s.spec, s.spec.split
    final_test = split == "test" and epoch == spec.cfg.epochs and spec.cfg.tensorboard  # the model kept, on test
    result = evaluate_sharded(s.learner.scored, s.data.eval_x, s.data.eval_y, spec.cfg.eval_batch_size, spec.ctx,
                              confusion=final_test)
    s.state.confusion = result.get("confusion", s.state.confusion)
    return {"epoch": epoch, "train_loss": round(train_loss, 6), f"{split}_loss": round(result["loss"], 6),
            f"{split}_accuracy": round(result["accuracy"], 4),
            "lr": current_lr(s), "seconds": round(seconds, 3)}


def current_lr(s: Session) -> float:
    """The learning rate of the step just taken (the first param group's: a backbone's is a fixed share of it)."""
    return lr_value(s.learner.optimizer.param_groups[0]["lr"])


class AgreedStop:
    """Whether to stop after this step. In one process: whether a stop was requested. Under torchrun a signal
    reaches the processes at different steps, or one alone (``kill`` of one rank), so after every step each
    process votes (``MaxVote``), and all stop after the step that follows the vote that saw the signal, all with
    it (the largest number if two came)."""

    def __init__(self, stop: StopFlag, ctx: DistContext) -> None:
        self.stop, self.vote = stop, MaxVote(ctx) if ctx.enabled else None

    def __call__(self) -> bool:
        if self.vote is None:
            return self.stop.is_set()
        return self._agreed(self.vote.put(self.stop.signum or 0))  # not this process's flag: the vote's

    def settle(self) -> bool:
        """The answer once every process has voted with what it knows now (after the last step)."""
        if self.vote is None:
            return self.stop.is_set()
        return self._agreed(max(self.vote.put(self.stop.signum or 0), self.vote.finish()))

    def drain(self) -> None:
        """Wait for the vote in flight (the other processes started it too), so none is left at a stop."""
        if self.vote is not None:
            self.vote.finish()

    def _agreed(self, signum: int) -> bool:
        if signum:
            self.stop.join(signum)
        return bool(signum)


def _pooled(progress: Progress, ctx: DistContext, device: torch.device) -> Progress:
    """``progress`` with every process's loss sum and image count: what last.pt keeps (``Progress.share``)."""
    if not ctx.enabled:
        return progress
    sums = ctx.all_reduce_sum(torch.tensor([progress.loss_sum, progress.seen], dtype=torch.float64, device=device))
    return Progress(progress.batches_done, sums[0].item(), int(sums[1].item()), progress.aug_rng)


def _interrupted(s: Session, files: RunFiles, epoch: int, halt: StopRequested, status: int) -> Interrupted:
    """Save the state inside the epoch (last.pt with its ``Progress``) and say how to continue; under torchrun
    every process comes here after the same step, rank 0 saves, and only its exception has a message."""
    s.state.train_seconds += halt.seconds
    learner, ctx = s.learner, s.spec.ctx
    progress = _pooled(halt.progress, ctx, s.spec.device)  # a collective: every process takes part
    if not ctx.is_main:
        return Interrupted("", status)
    files.save_epoch(learner.model, None, learner.optimizer, s.state, learner.ema, partial=progress)
    how = (f"the same torchrun command with -m mnist_classifier train --resume {files.run_dir}" if ctx.enabled
           else f"mnist train --resume {files.run_dir}")
    return Interrupted(
        f"interrupted at epoch {epoch}, batch {progress.batches_done} of {learner.loop.n_batches}; saved "
        f"{files.run_dir / 'last.pt'}. Continue with: {how}", status)


def _diverged(exc: DivergedError, files: RunFiles) -> DivergedError:
    kept = (f"the last good checkpoint is kept in {files.run_dir}" if (files.run_dir / "last.pt").exists()
            else "no epoch had finished, so no checkpoint was written")
    return DivergedError(f"{exc}; {kept}")


def _each_step(reporter: Reporter, follower: LoadFollower | None) -> OnStep:
    """What runs after every step: the reporter's progress, then the thread count's check when it follows load."""
    if follower is None:
        return reporter.step

    def step(epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        reporter.step(epoch, batch, n_batches, loss)
        follower()
    return step


def run_epochs(s: Session, files: RunFiles, reporter: Reporter, start: Progress | None,
               follower: LoadFollower | None = None) -> tuple[dict | None, int | None]:
    """The epoch loop; returns the validation-chosen weights (in memory) with --val-size, else None, and the exit
    status of a stop requested after the last step, else None."""
    spec, learner, state = s.spec, s.learner, s.state
    best_state = None
    with stop_requests(forwarded=spec.ctx.enabled) as stop:
        stopping = AgreedStop(stop, spec.ctx)
        learner.loop.stop_requested, learner.loop.on_step = stopping, _each_step(reporter, follower)
        for epoch in range(state.epoch + 1, spec.cfg.epochs + 1):
            perm = epoch_permutation(len(s.data.train_y), spec.cfg.seed, epoch).to(spec.device)
            try:
                train_loss, seconds = train_one_epoch(learner, spec, epoch, perm, start)
            except StopRequested as halt:
                stopping.drain()
                raise _interrupted(s, files, epoch, halt, stop.exit_status()) from None
            except DivergedError as exc:
                raise _diverged(exc, files) from None
            start = None
            state.train_seconds += seconds
            state.bn_seconds += calibrate(s, perm)  # the same shuffle: computed once per epoch
            row = score_epoch(s, epoch, train_loss, seconds)
            state.rows.append(row)
            state.epoch = epoch
            improved = row[f"{spec.split}_accuracy"] > state.best_val
            if improved:
                state.best_val, state.best_epoch = row[f"{spec.split}_accuracy"], epoch
                best_state = checkpoint.plain_state_dict(learner.scored) if spec.cfg.val_size else best_state
            # Without a validation split the model kept is the last one (the guide's behaviour); with one, the best.
            if spec.ctx.is_main:
                keep = improved or not spec.cfg.val_size
                files.save_epoch(learner.model, learner.scored if keep else None, learner.optimizer, state, learner.ema)
            reporter.epoch(row)
    # A stop that came after the last step (while the last epoch was scored, saved or reported) is not lost:
    # the run finishes, then says it was interrupted, so that a sweep takes no further trial
    return best_state, stop.exit_status() if stopping.settle() else None


def test_chosen(s: Session, best_state: dict | None, run_dir: Path) -> dict[str, Any]:
    """With --val-size the test set is looked at once, here, for the model the validation split chose."""
    spec = s.spec
    best = build_model(spec.mcfg).to(spec.device, memory_format=preferred_memory_format(spec.device))
    best.load_state_dict(best_state if best_state is not None else checkpoint.load(run_dir / "model.pt")["state_dict"])
    test = evaluate_sharded(best, s.data.test_x, s.data.test_y, spec.cfg.eval_batch_size, spec.ctx,
                            confusion=spec.cfg.tensorboard)
    s.state.confusion = test.get("confusion")
    return {"best_epoch": s.state.best_epoch, "val_accuracy": s.state.best_val,
            "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 6)}


def finish(s: Session, best_state: dict | None, run_dir: Path, t_start: float,
           follower: LoadFollower | None = None) -> dict[str, Any]:
    """The summary (written as summary.json by rank 0)."""
    spec, ctx = s.spec, s.spec.ctx
    cfg = spec.cfg
    summary: dict[str, Any] = {
        "epochs": cfg.epochs, "params": s.learner.params, "device": str(spec.device),
        "precision": _precision(spec), "seed": cfg.seed, "model": cfg.model, "recipe": cfg.recipe,
        "dataset": spec.info.name, "run_dir": str(run_dir), "test_images": len(s.data.test_y),
    }
    if cfg.val_size:
        summary.update(test_chosen(s, best_state, run_dir))
    else:
        last = s.state.rows[-1]
        summary.update({"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"]})
    drop = final_drop(s.state.rows, spec.split, len(s.data.eval_y))
    if drop is not None:
        summary["final_drop"] = drop
    summary.update({"train_seconds": round(s.state.train_seconds, 3), "precise_bn_seconds": round(s.state.bn_seconds, 3),
                    "whiten_seconds": round(s.state.whiten_seconds, 3),
                    "total_seconds": round(time.perf_counter() - t_start, 3), "world_size": ctx.world_size,
                    "threads": torch.get_num_threads()})  # what the thread policy (or --threads) gave torch last
    if follower is not None:  # [seconds after the start, threads from then on] each time the policy chose again
        summary["threads_followed"] = [list(change) for change in follower.changes]
    if ctx.enabled:
        summary["weights_identical_across_ranks"] = same_on_all_ranks(list(s.learner.model.state_dict().values()), ctx)
    if ctx.is_main:
        fileio.write_json(run_dir / "summary.json", summary)
    ctx.barrier()  # nobody leaves (and tears the group down) while rank 0 is still writing
    return summary


def resumed_progress(resume: dict[str, Any] | None, n_batches: int, world: int = 1) -> Progress | None:
    """Where inside an epoch a resumed last.pt stopped (Ctrl-C), or None; refused past this run's epoch. Each of
    ``world`` processes gets its share (``Progress.share``)."""
    if resume is None or not resume.get("partial"):
        return None
    partial = Progress.from_payload(resume["partial"])
    if partial.batches_done >= n_batches:
        raise UserError(f"last.pt says its epoch stopped after batch {partial.batches_done}, but an epoch of this run "
                        f"has {n_batches}; it was damaged or written by another run")
    return partial.share(world)


def fit(cfg: TrainConfig, splits: Splits, device: torch.device, run_dir: Path, reporter: Reporter | None = None,
        resume: dict[str, Any] | None = None, ctx: DistContext = SINGLE, follow_load: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on ``splits`` and write the run folder; return the summary dict.

    ``resume`` is a ``last.pt`` payload; training continues after its last completed epoch. Under
    torchrun (``ctx``), every process trains its shard of each batch and only rank 0 writes files.
    ``follow_load`` (on a CPU, one process): the thread policy chooses torch's threads again as other work
    starts or stops (``LoadFollower``).
    """
    reporter, t_start = reporter or Reporter(), time.perf_counter()
    check_config(cfg)
    check_batch(cfg.batch_size, ctx)
    if device.type == "cpu":
        flush_denormals()  # subnormal arithmetic slows late epochs by ~10 %; before the first parallel op
    s = build_session(cfg, splits, device, ctx, resume)
    partial = resumed_progress(resume, s.learner.loop.n_batches, ctx.world_size)
    run_dir = Path(run_dir)
    files = RunFiles(run_dir, cfg, s.spec.mcfg, s.spec.info, device)
    if ctx.is_main:
        write_config(s.spec, run_dir)
    resumed_at = (s.state.epoch + 1, partial.batches_done if partial else 0) if resume else None
    log = (TensorBoardLog(run_dir, s.learner.loop.n_batches, s.spec.split, resumed_at, functools.partial(current_lr, s))
           if cfg.tensorboard and ctx.is_main else None)
    try:
        reporter = WithLog(reporter, log) if log else reporter
        reporter.start(start_info(s, run_dir))
        follower = LoadFollower() if follow_load and device.type == "cpu" and not ctx.enabled else None
        best_state, late_stop = run_epochs(s, files, reporter, partial, follower)
        summary = finish(s, best_state, run_dir, t_start, follower)
        if log:
            log.finish(cfg, summary, s.state.confusion)
    except BaseException:
        if log:
            with contextlib.suppress(OSError):  # a full disk must not hide what ended the run (Ctrl-C, pruning)
                log.unfinished(cfg, s.state.rows[-1] if s.state.rows else None)
        raise
    finally:
        if log:
            log.close()
    if late_stop is not None:
        said = f"interrupted after the last epoch; the run finished and is saved in {run_dir}"
        raise Interrupted(said if ctx.is_main else "", late_stop)
    return summary
