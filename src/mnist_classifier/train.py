"""Training: the whole data set on the device, batches sliced from one permutation per epoch.

``fit`` runs the seed guide's loop (forward, cross-entropy, backward, step; test after each epoch) and writes
the run folder. It never prints: progress goes to a ``Reporter`` the caller supplies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, fileio, runs
from .config import TrainConfig
from .data import DatasetInfo, Splits
from .device import autocast_dtype, preferred_memory_format
from .errors import DivergedError, UserError
from .evaluate import evaluate
from .model import ModelConfig, build_model, count_parameters
from .preprocess import model_input


class Reporter:
    """Receives progress from ``fit``. The default ignores everything; the CLI prints."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        """Called after every optimizer step; ``loss`` (mean since the last report) only every ``log_every`` batches."""

    def epoch(self, row: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """What ``last.pt`` restores: where we are and the history so far."""

    epoch: int = 0  # epochs completed
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv so far
    train_seconds: float = 0.0  # time in the training loop only, summed over epochs


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernels update every parameter in one call instead of a dozen small ops per tensor;
    # same arithmetic as the default path (CPU and CUDA have them, MPS partly).
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, **fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}")


def model_config(cfg: TrainConfig, info: DatasetInfo) -> ModelConfig:
    """The architecture follows the data: channels, image size and class count come from the data set."""
    return ModelConfig(
        name=cfg.model, in_channels=info.channels, image_size=info.image_size,
        num_classes=len(info.class_names), dropout=cfg.dropout,
    )


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle for ``epoch`` (1-based) depends only on (seed, epoch), so a resumed run replays it exactly."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    perm: torch.Tensor,
    batch_size: int,
    epoch: int = 1,
    amp_dtype: torch.dtype | None = None,
    log_every: int = 100,
    on_step: Callable[[int, int, int, float | None], None] | None = None,
) -> float:
    """One pass over ``train_x`` (N, C, H, W) in the order ``perm`` (N,); returns the mean training loss.

    Each batch is a slice of the permutation: forward, cross-entropy, backward, optimizer step. ``on_step``
    gets (epoch, batch index, batches, loss) after every step, with the mean loss since the last report every
    ``log_every`` batches (and on the last) and None otherwise, so the loss is only read back that often.
    """
    model.train()
    n = len(perm)
    n_batches = (n + batch_size - 1) // batch_size  # the last, smaller batch is kept, as DataLoader does
    running = torch.zeros((), device=train_x.device)  # summed loss since the last report, kept on device
    total = torch.zeros((), device=train_x.device)  # summed per-example loss over the epoch
    since = 0
    for b in range(n_batches):
        idx = perm[b * batch_size : (b + 1) * batch_size]
        x, y = train_x[idx], train_y[idx]  # (B, C, H, W) float, (B,) int64
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        detached = loss.detach()
        running += detached
        total += detached * len(y)
        since += 1
        report = b % log_every == 0 or b == n_batches - 1
        mean_loss = (running / since).item() if report else None
        if report:
            if not math.isfinite(mean_loss):
                raise DivergedError(
                    f"loss became {mean_loss} at epoch {epoch}, batch {b}; lower the learning rate "
                    f"(the guide's advice for a NaN loss, e.g. divide --lr by 10)"
                )
            running.zero_()
            since = 0
        if on_step is not None:
            on_step(epoch, b, n_batches, mean_loss)
    return total.item() / n


def load_resume(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved config and payload of ``<run_dir>/last.pt``, for ``--resume``."""
    path = Path(run_dir) / "last.pt"
    if not Path(run_dir).is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    payload = checkpoint.load(path)
    for key in ("optimizer", "epoch", "train_config", "rng", "metrics"):
        if key not in payload:
            raise UserError(f"{path} is not a resumable checkpoint (no {key!r}); it may be a model.pt")
    return TrainConfig.from_dict(payload["train_config"]), payload


def fit(
    cfg: TrainConfig,
    splits: Splits,
    device: torch.device,
    run_dir: Path,
    reporter: Reporter | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``splits`` and write the run folder; return the summary dict.

    ``resume`` is a ``last.pt`` payload; training continues after its last completed epoch.
    """
    reporter = reporter or Reporter()
    t_start = time.perf_counter()
    info = splits.info
    mcfg = model_config(cfg, info)

    amp_dtype = autocast_dtype(cfg.precision, device)
    fmt = preferred_memory_format(device)
    torch.manual_seed(cfg.seed)  # weight init and dropout
    model = build_model(mcfg).to(device, memory_format=fmt)
    optimizer = make_optimizer(cfg, model.parameters(), device)
    state = TrainState()
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        state = TrainState(epoch=int(resume["epoch"]), rows=list(resume["metrics"]),
                           train_seconds=float(resume.get("train_seconds", 0.0)))
        _set_rng_state(resume["rng"], device)

    # The whole set on the device, normalised once: (N, C, H, W) float32 and (N,) int64.
    n_train = cfg.train_subset or len(splits.train_labels)
    train_x = model_input(splits.train_images[:n_train], info.mean, info.std, device)
    train_y = splits.train_labels[:n_train].to(device)
    test_x = model_input(splits.test_images, info.mean, info.std, device)
    test_y = splits.test_labels.to(device)
    n_batches = (n_train + cfg.batch_size - 1) // cfg.batch_size

    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"
    fileio.write_json(run_dir / "config.json", {
        "train": cfg.to_dict(), "model": mcfg.to_dict(), "dataset": checkpoint.dataset_dict(info),
        "device": str(device), "autocast": precision, "environment": runs.environment(),
    })
    params = count_parameters(model)
    reporter.start({"device": str(device), "precision": precision, "params": params, "n_train": n_train,
                    "n_test": len(test_y), "n_batches": n_batches, "start_epoch": state.epoch + 1,
                    "epochs": cfg.epochs, "run_dir": str(run_dir)})

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        perm = epoch_permutation(n_train, cfg.seed, epoch).to(device)
        _sync(device)
        t0 = time.perf_counter()
        try:
            train_loss = train_epoch(model, optimizer, train_x, train_y, perm, cfg.batch_size, epoch=epoch,
                                     amp_dtype=amp_dtype, log_every=cfg.log_every, on_step=reporter.step)
        except DivergedError as exc:
            raise DivergedError(f"{exc}. The last good checkpoint is kept in {run_dir}") from None
        _sync(device)
        seconds = time.perf_counter() - t0
        state.train_seconds += seconds

        test = evaluate(model, test_x, test_y, cfg.eval_batch_size, amp_dtype)
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "test_loss": round(test["loss"], 6),
            "test_accuracy": round(test["accuracy"], 4),
            "seconds": round(seconds, 3),
        }
        state.rows.append(row)
        state.epoch = epoch
        _save_epoch(run_dir, model, mcfg, info, optimizer, cfg, state, device)
        reporter.epoch(row)

    final = state.rows[-1]
    summary = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "train_seconds": round(state.train_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "epochs": cfg.epochs,
        "params": params,
        "device": str(device),
        "seed": cfg.seed,
        "model": cfg.model,
        "dataset": info.name,
        "run_dir": str(run_dir),
    }
    fileio.write_json(run_dir / "summary.json", summary)
    return summary


def _save_epoch(
    run_dir: Path, model: nn.Module, mcfg: ModelConfig, info: DatasetInfo, optimizer: torch.optim.Optimizer,
    cfg: TrainConfig, state: TrainState, device: torch.device,
) -> None:
    """After each epoch: metrics.csv, model.pt and last.pt, each replaced atomically (last.pt last)."""
    fileio.write_csv(run_dir / "metrics.csv", state.rows)
    payload = checkpoint.model_payload(model, mcfg, info)
    checkpoint.save(run_dir / "model.pt", payload)
    payload.update({
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "metrics": state.rows,
        "train_seconds": state.train_seconds,
        "train_config": cfg.to_dict(),
        "rng": _rng_state(device),
    })
    checkpoint.save(run_dir / "last.pt", payload)
