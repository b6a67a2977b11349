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
    rule: str  # the rule that gave ``suggestion``: minimum/10 where the descent was too short for a slope
    stopped_at: float | None  # the learning rate at which the loss diverged (None: it never did)
    warning: str | None = None  # the range missed the descent, so the suggestion is a guess; what to change

    def to_dict(self) -> dict[str, Any]:
        return {"suggested_lr": self.suggestion, "rule": self.rule, "steps": len(self.lrs),
                "stopped_at_lr": self.stopped_at, "min_loss_lr": self.lrs[int(np.argmin(self.smoothed))],
                "warning": self.warning}


def ramp(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` learning rates growing exponentially from ``start`` to ``end``."""
    return start * (end / start) ** (np.arange(steps) / max(1, steps - 1))


def _skip(steps: int) -> int:
    return max(1, steps // 10)  # the first steps' average is mostly its starting value


def suggest(lrs: list[float], smoothed: list[float], rule: str) -> tuple[float, str]:
    """The suggested rate and the rule that gave it, from the part of the curve before its minimum."""
    low, skip = int(np.argmin(smoothed)), _skip(len(lrs))
    if rule == "minimum/10" or low - skip < 2:  # minimum/10 also where the descent is too short for a slope
        return lrs[low] / 10, "minimum/10"
    slope = np.gradient(np.asarray(smoothed[skip:low + 1]), np.log10(np.asarray(lrs[skip:low + 1])))
    return lrs[skip + int(np.argmin(slope))], rule


def range_warning(lrs: list[float], smoothed: list[float], stopped: float | None, steps: int) -> str | None:
    """What to change when the range missed the loss's descent: a minimum among the first steps (the rates were
    already too high, or too low to move the loss, which then wanders), or a loss still falling at the end."""
    low = int(np.argmin(smoothed))
    if low - _skip(len(lrs)) < 2:
        return (f"the smoothed loss was lowest at step {low + 1} of {len(lrs)} (lr {lrs[low]:.2g}): the range missed "
                f"the descent, so the suggestion is a guess; start lower (--start) or, if the loss stayed flat, end "
                f"higher (--end)")
    if stopped is None and low == steps - 1:
        return (f"the loss was still falling at the last rate (lr {lrs[low]:.2g}); end higher (--end) to see where "
                f"it turns")
    return None


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
    return LRFindResult(lrs, losses, smoothed, *suggest(lrs, good, rule), stopped,
                        range_warning(lrs, good, stopped, steps))
