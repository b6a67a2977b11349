"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's ``lr_find``): train a fresh
model for a few hundred steps while the learning rate grows exponentially, watch the loss, stop once it
diverges, and suggest a rate from the curve. Nothing is saved but the plot; the model is thrown away.

Two rules, both named in the output:
- ``steepest``: where the smoothed loss falls fastest against log(lr) (Lightning's default suggestion);
- ``minimum/10``: a tenth of the rate at the lowest smoothed loss (fastai's original rule of thumb).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..data import Splits
from ..errors import UserError
from ..training.distributed import SINGLE
from ..training.epoch import epoch_permutation
from ..training.session import build_session

RULES = ("steepest", "minimum/10")
SMOOTHING = 0.98  # weight of the running loss average (fastai's): a batch of 64 is a noisy estimate
DIVERGED = 4.0  # stop when the smoothed loss exceeds four times its lowest value


@dataclass
class LRFindResult:
    lrs: list[float]  # one per step taken
    losses: list[float]  # raw batch losses
    smoothed: list[float]  # debiased exponential average of ``losses``
    suggestion: float
    rule: str
    stopped_at: float | None  # the learning rate at which the loss diverged (None: it never did)

    def to_dict(self) -> dict[str, Any]:
        return {"suggested_lr": self.suggestion, "rule": self.rule, "steps": len(self.lrs),
                "stopped_at_lr": self.stopped_at, "min_loss_lr": self.lrs[int(np.argmin(self.smoothed))]}


def ramp(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` learning rates growing exponentially from ``start`` to ``end``."""
    return start * (end / start) ** (np.arange(steps) / max(1, steps - 1))


def suggest(lrs: list[float], smoothed: list[float], rule: str) -> float:
    """The suggested rate under ``rule``, from the part of the curve before its minimum."""
    low = int(np.argmin(smoothed))
    if rule == "minimum/10":
        return lrs[low] / 10
    skip = max(1, len(lrs) // 10)  # the first steps' average is mostly its starting value
    if low - skip < 2:
        return lrs[low] / 10  # too short a descent to measure a slope
    slope = np.gradient(np.asarray(smoothed[skip:low + 1]), np.log10(np.asarray(lrs[skip:low + 1])))
    return lrs[skip + int(np.argmin(slope))]


def lr_find(cfg: TrainConfig, splits: Splits, device: torch.device, start: float = 1e-7, end: float = 10.0,
            steps: int = 200, rule: str = "steepest") -> LRFindResult:
    """Run the range test for ``cfg``'s model, optimizer, batch size and data (its lr is ignored)."""
    if not (0 < start < end and 10 <= steps <= 100_000 and rule in RULES):
        raise UserError(f"--start and --end must satisfy 0 < start < end, --steps be 10-100000 and --rule one of "
                        f"{', '.join(RULES)}")
    session = build_session(cfg, splits, device, SINGLE)
    step, n = session.learner.loop.step, len(session.data.train_y)
    session.learner.train_model.train()
    perm = epoch_permutation(n, cfg.seed, 1).to(device)
    lrs, losses, smoothed, avg, stopped = [], [], [], 0.0, None
    for i, lr in enumerate(ramp(start, end, steps)):
        first = (i * cfg.batch_size) % max(1, n - cfg.batch_size + 1)  # wraps round: a few hundred steps
        loss = float(step(perm[first:first + cfg.batch_size], float(lr)))
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        value = avg / (1 - SMOOTHING ** (i + 1))
        lrs.append(float(lr))
        losses.append(loss)
        smoothed.append(value)
        if not math.isfinite(value) or value > DIVERGED * min(smoothed):
            stopped = float(lr)
            break
    good = [v if math.isfinite(v) else math.inf for v in smoothed]
    return LRFindResult(lrs, losses, smoothed, suggest(lrs, good, rule), rule, stopped)
