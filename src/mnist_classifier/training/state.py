"""What a run keeps between epochs and across a restart: ``TrainState``, and the run folder's checkpoints.

After each epoch ``save_epoch`` writes metrics.csv, model.pt (the evaluated weights) and last.pt (model.pt plus
the optimizer, RNG state, epoch and metrics), each replaced atomically; ``--resume`` reads last.pt back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import fileio
from ..config import TrainConfig
from ..data import DatasetInfo
from ..errors import UserError
from ..models import ModelConfig
from ..models import checkpoint
from .epoch import Progress
from .optim import EMA

RESUME_KEYS = ("optimizer", "epoch", "train_config", "rng", "metrics")


@dataclass
class TrainState:
    """Where a run is and its history so far."""

    epoch: int = 0  # epochs completed
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv so far
    train_seconds: float = 0.0  # time in the training loop only, summed over epochs
    bn_seconds: float = 0.0  # time recomputing batch norm's statistics (--precise-bn), summed over epochs
    whiten_seconds: float = 0.0  # time setting the first layer from the data before training (--whiten-init)
    best_val: float = -1.0  # best validation accuracy so far (with val_size)
    best_epoch: int = 0
    confusion: Any = None  # (C, C) test-set confusion of the model kept, once known (for TensorBoard; not saved)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "TrainState":
        return cls(epoch=int(payload["epoch"]), rows=list(payload["metrics"]),
                   train_seconds=float(payload.get("train_seconds", 0.0)),
                   bn_seconds=float(payload.get("bn_seconds", 0.0)),
                   whiten_seconds=float(payload.get("whiten_seconds", 0.0)),
                   best_val=float(payload.get("best_val", -1.0)), best_epoch=int(payload.get("best_epoch", 0)))


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_resume(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved config and payload of ``<run_dir>/last.pt``, for ``--resume``."""
    path = Path(run_dir) / "last.pt"
    if not Path(run_dir).is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    payload = checkpoint.load(path)
    for key in RESUME_KEYS:
        if key not in payload:
            raise UserError(f"{path} is not a resumable checkpoint (no {key!r}); it may be a model.pt")
    problem = resume_problem(payload)
    if problem:
        raise UserError(f"{path} cannot be resumed: {problem}; it was damaged or not written by `mnist train`")
    return TrainConfig.from_dict(payload["train_config"]), payload


def _count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return _real(value) and math.isfinite(value)


def _bytes_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def resume_problem(payload: dict[str, Any]) -> str | None:
    """What is wrong with a last.pt's training state (its plain fields: epoch, metrics, times, RNG, the position
    inside an epoch), or None. The weights and the optimizer are checked by loading them (``restore``)."""
    epoch, rows = payload["epoch"], payload["metrics"]
    if not isinstance(payload["train_config"], dict):
        return "its train_config is not a mapping"
    if not _count(epoch):
        return f"its epoch is {epoch!r}, not a count of epochs"
    if not (isinstance(rows, list) and len(rows) == epoch and all(isinstance(r, dict) for r in rows)):
        return f"its metrics are not {epoch} rows, one per epoch"
    split = "val" if payload["train_config"].get("val_size") else "test"
    columns = {"epoch", "train_loss", f"{split}_loss", f"{split}_accuracy", "lr", "seconds"}  # fit.score_epoch's
    if any(set(r) != columns or not all(_real(v) for v in r.values()) or r["epoch"] != i for i, r in enumerate(rows, 1)):
        return f"its metrics rows are not epochs 1-{epoch} with the columns {', '.join(sorted(columns))}"
    times = [payload.get(k, 0.0) for k in ("train_seconds", "bn_seconds", "whiten_seconds", "best_val")]
    if not all(_number(t) for t in times) or not _count(payload.get("best_epoch", 0)) \
            or payload.get("best_epoch", 0) > epoch or not _count(payload.get("ema_updates", 0)):
        return "its times, best epoch or EMA count are not numbers in range"
    if not (isinstance(payload["rng"], dict) and _bytes_tensor(payload["rng"].get("torch"))):
        return "its random-number state is not a byte tensor"
    return _partial_problem(payload.get("partial"))


def _partial_problem(partial: Any) -> str | None:
    """The position inside an epoch that a Ctrl-C saved (``Progress.to_payload``), when there is one."""
    if partial is None:
        return None
    # The loss sum may be NaN: a run stopped between two read-backs of its loss can have diverged unnoticed,
    # and the resumed run then says so; that is not damage.
    if not (isinstance(partial, dict) and _count(partial.get("batches_done")) and _count(partial.get("seen"))
            and _real(partial.get("loss_sum")) and _bytes_tensor(partial.get("aug_rng"))):
        return "its position inside the interrupted epoch is not batches, images, a loss sum and an RNG state"
    return None


@dataclass
class RunFiles:
    """What the run folder's checkpoints are made of; ``save_epoch`` writes them."""

    run_dir: Path
    cfg: TrainConfig
    mcfg: ModelConfig
    info: DatasetInfo
    device: torch.device

    def save_epoch(self, model: nn.Module, scored: nn.Module | None, optimizer: torch.optim.Optimizer,
                   state: TrainState, ema: EMA | None, partial: Progress | None = None) -> None:
        """metrics.csv, then model.pt from ``scored`` (None: keep the old one), then last.pt from ``model``.

        ``partial`` marks a last.pt written inside an epoch (after Ctrl-C): how far that epoch got.
        """
        fileio.write_csv(self.run_dir / "metrics.csv", state.rows)
        if scored is not None:
            checkpoint.save(self.run_dir / "model.pt", checkpoint.model_payload(scored, self.mcfg, self.info))
        payload = checkpoint.model_payload(model, self.mcfg, self.info)  # the raw training weights, to continue from
        payload.update({
            "optimizer": optimizer.state_dict(), "epoch": state.epoch, "metrics": state.rows,
            "train_seconds": state.train_seconds, "bn_seconds": state.bn_seconds, "whiten_seconds": state.whiten_seconds, "best_val": state.best_val, "best_epoch": state.best_epoch,
            "train_config": self.cfg.to_dict(), "rng": rng_state(self.device),
        })
        if ema is not None:
            payload["ema_state_dict"] = checkpoint.plain_state_dict(ema.model)
            payload["ema_updates"] = ema.updates
        if partial is not None:
            payload["partial"] = partial.to_payload()
        checkpoint.save(self.run_dir / "last.pt", payload)
