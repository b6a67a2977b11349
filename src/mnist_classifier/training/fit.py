"""``fit``: train a model and write its run folder. The whole loop reads top to bottom:

    session = build_session(...)           # data on the device, model, optimizer, EMA, resume
    for epoch in ...:
        train_loss, seconds = train_one_epoch(...)    # batches of one permutation, one step each
        row = score_epoch(...)                        # fp32 accuracy on the test (or validation) set
        save the epoch                                # metrics.csv, model.pt, last.pt
    return finish(...)                     # the validation-chosen model's test score, summary.json

It never prints: progress goes to a ``Reporter`` the caller supplies.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..config import TrainConfig
from ..data import Splits, check_name
from ..device import flush_denormals, preferred_memory_format
from ..errors import DivergedError, Interrupted, UserError
from ..evaluation import evaluate_model
from ..models import build_model, check_model, count_parameters
from ..models.registry import SELF_NORMALISING
from ..models import checkpoint
from .. import runs
from .distributed import SINGLE, DistContext, check_batch, same_on_all_ranks
from .epoch import Progress, StopFlag, StopRequested, epoch_permutation
from .optim import lr_value
from .session import Session, build_session
from .state import RunFiles


class Reporter:
    """Receives progress from ``fit``. The default ignores everything; the CLI prints."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        """Called after every optimizer step; ``loss`` (mean since the last report) only every ``log_every`` batches."""

    def epoch(self, row: dict[str, Any]) -> None: ...


def check_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg.validate()`` plus the names only the registries know: the data set and the model."""
    cfg.validate()
    check_name(cfg.dataset)
    name = check_model(cfg.model)
    if (cfg.pretrained or cfg.input_size) and name not in SELF_NORMALISING:
        raise UserError(f"--pretrained and --input-size are for {', '.join(sorted(SELF_NORMALISING))}, not {cfg.model}")
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _precision(s: Session) -> str:
    return str(s.amp_dtype).removeprefix("torch.") if s.amp_dtype else "fp32"


def write_config(s: Session, run_dir: Path) -> None:
    fileio.write_json(run_dir / "config.json", {
        "train": s.cfg.to_dict(), "model": s.mcfg.to_dict(), "dataset": s.info.to_dict(), "device": str(s.device),
        "autocast": _precision(s), "world_size": s.ctx.world_size, "environment": runs.environment(),
    })


def start_info(s: Session, run_dir: Path) -> dict[str, Any]:
    return {"device": str(s.device), "precision": _precision(s), "params": count_parameters(s.model),
            "n_train": len(s.data.train_y), "n_test": len(s.data.eval_y), "split": "val" if s.cfg.val_size else "test",
            "n_batches": s.loop.n_batches, "start_epoch": s.state.epoch + 1, "epochs": s.cfg.epochs,
            "run_dir": str(run_dir), "world_size": s.ctx.world_size}


def train_one_epoch(s: Session, files: RunFiles, epoch: int, start: Progress | None,
                    aug_rng: torch.Tensor | None) -> tuple[float, float]:
    """Train one epoch (from ``start`` inside it, after a Ctrl-C); return (mean training loss, seconds)."""
    perm = epoch_permutation(len(s.data.train_y), s.cfg.seed, epoch).to(s.device)
    if aug_rng is not None:  # inside an epoch: the augmentation's stream where the Ctrl-C left it
        s.aug_gen.set_state(aug_rng.to(s.aug_gen.get_state().device))
    elif s.aug_gen is not None:  # reseeded like the shuffle, so a resumed run replays it
        s.aug_gen.manual_seed(s.cfg.seed * 1_000_003 + epoch)
    s.train_model.train()
    _sync(s.device)
    t0 = time.perf_counter()
    try:
        train_loss = s.loop.run(epoch, perm, start)
    except DivergedError as exc:
        kept = (f"the last good checkpoint is kept in {files.run_dir}" if (files.run_dir / "last.pt").exists()
                else "no epoch had finished, so no checkpoint was written")
        raise DivergedError(f"{exc}; {kept}") from None
    except StopRequested as halt:
        s.state.train_seconds += time.perf_counter() - t0
        if s.ctx.is_main:
            files.save_epoch(s.model, None, s.optimizer, s.state, s.ema, partial=halt.progress,
                             aug_rng=s.aug_gen.get_state() if s.aug_gen is not None else None)
        raise Interrupted(
            f"interrupted at epoch {epoch}, batch {halt.progress.batches_done} of {s.loop.n_batches}; saved "
            f"{files.run_dir / 'last.pt'}. Continue with: mnist train --resume {files.run_dir}") from None
    _sync(s.device)
    seconds = time.perf_counter() - t0
    s.state.train_seconds += seconds
    if s.ctx.enabled:  # the mean over all processes' images
        pair = torch.tensor([train_loss * s.local_count, s.local_count], dtype=torch.float64, device=s.device)
        pair = s.ctx.all_reduce_sum(pair)
        train_loss = (pair[0] / pair[1]).item()
    return train_loss, seconds


def score_epoch(s: Session, epoch: int, train_loss: float, seconds: float) -> dict[str, Any]:
    """The metrics.csv row of an epoch: the scored weights on this process's shard of the evaluation split."""
    ctx, split = s.ctx, "val" if s.cfg.val_size else "test"
    result = evaluate_model(s.scored, s.data.eval_x[ctx.rank :: ctx.world_size], s.data.eval_y[ctx.rank :: ctx.world_size],
                            s.cfg.eval_batch_size, reduce=ctx.all_reduce_sum)
    return {"epoch": epoch, "train_loss": round(train_loss, 6), f"{split}_loss": round(result["loss"], 6),
            f"{split}_accuracy": round(result["accuracy"], 4), "lr": lr_value(s.optimizer.param_groups[0]["lr"]),
            "seconds": round(seconds, 3)}


def run_epochs(s: Session, files: RunFiles, reporter: Reporter, partial: dict[str, Any] | None) -> dict | None:
    """The epoch loop; returns the validation-chosen weights (in memory) with --val-size, else None."""
    best_state = None
    stop = StopFlag(install=not s.ctx.enabled)
    s.loop.stop_requested, s.loop.on_step = stop.is_set, reporter.step
    try:
        for epoch in range(s.state.epoch + 1, s.cfg.epochs + 1):
            start = Progress(partial["batches_done"], partial["loss_sum"], partial["seen"]) if partial else None
            aug_rng = partial["aug_rng"] if partial and s.aug_gen is not None else None
            train_loss, seconds = train_one_epoch(s, files, epoch, start, aug_rng)
            partial = None
            row = score_epoch(s, epoch, train_loss, seconds)
            s.state.rows.append(row)
            s.state.epoch = epoch
            accuracy = row["val_accuracy" if s.cfg.val_size else "test_accuracy"]
            improved = accuracy > s.state.best_val
            if improved:
                s.state.best_val, s.state.best_epoch = accuracy, epoch
                best_state = checkpoint.plain_state_dict(s.scored) if s.cfg.val_size else best_state
            # Without a validation split the model kept is the last one (the guide's behaviour); with one, the best.
            if s.ctx.is_main:
                keep = improved or not s.cfg.val_size
                files.save_epoch(s.model, s.scored if keep else None, s.optimizer, s.state, s.ema)
            reporter.epoch(row)
    finally:
        stop.uninstall()
    return best_state


def test_chosen(s: Session, best_state: dict | None, run_dir: Path) -> dict[str, Any]:
    """With --val-size the test set is looked at once, here, for the model the validation split chose."""
    best = build_model(s.mcfg).to(s.device, memory_format=preferred_memory_format(s.device))
    best.load_state_dict(best_state if best_state is not None else checkpoint.load(run_dir / "model.pt")["state_dict"])
    ctx = s.ctx
    test = evaluate_model(best, s.data.test_x[ctx.rank :: ctx.world_size], s.data.test_y[ctx.rank :: ctx.world_size],
                          s.cfg.eval_batch_size, reduce=ctx.all_reduce_sum)
    return {"best_epoch": s.state.best_epoch, "val_accuracy": s.state.best_val,
            "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 6)}


def finish(s: Session, best_state: dict | None, run_dir: Path, t_start: float) -> dict[str, Any]:
    """The summary (written as summary.json by rank 0)."""
    cfg, ctx = s.cfg, s.ctx
    summary: dict[str, Any] = {
        "epochs": cfg.epochs, "params": count_parameters(s.model), "device": str(s.device), "precision": _precision(s),
        "seed": cfg.seed, "model": cfg.model, "recipe": cfg.recipe, "dataset": s.info.name, "run_dir": str(run_dir),
    }
    if cfg.val_size:
        summary.update(test_chosen(s, best_state, run_dir))
    else:
        last = s.state.rows[-1]
        summary.update({"test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"]})
    summary.update({"train_seconds": round(s.state.train_seconds, 3),
                    "total_seconds": round(time.perf_counter() - t_start, 3), "world_size": ctx.world_size})
    if ctx.enabled:
        summary["weights_identical_across_ranks"] = same_on_all_ranks(list(s.model.state_dict().values()), ctx)
    if ctx.is_main:
        fileio.write_json(run_dir / "summary.json", summary)
    ctx.barrier()  # nobody leaves (and tears the group down) while rank 0 is still writing
    return summary


def fit(cfg: TrainConfig, splits: Splits, device: torch.device, run_dir: Path, reporter: Reporter | None = None,
        resume: dict[str, Any] | None = None, ctx: DistContext = SINGLE) -> dict[str, Any]:
    """Train ``cfg.model`` on ``splits`` and write the run folder; return the summary dict.

    ``resume`` is a ``last.pt`` payload; training continues after its last completed epoch. Under
    torchrun (``ctx``), every process trains its shard of each batch and only rank 0 writes files.
    """
    reporter, t_start = reporter or Reporter(), time.perf_counter()
    check_config(cfg)
    check_batch(cfg.batch_size, ctx)
    if device.type == "cpu":
        flush_denormals()  # subnormal arithmetic slows late epochs by ~10 %; before the first parallel op
    s = build_session(cfg, splits, device, ctx, resume)
    run_dir = Path(run_dir)
    files = RunFiles(run_dir, cfg, s.mcfg, s.info, device)
    if ctx.is_main:
        write_config(s, run_dir)
    reporter.start(start_info(s, run_dir))
    best_state = run_epochs(s, files, reporter, resume.get("partial") if resume is not None else None)
    return finish(s, best_state, run_dir, t_start)
