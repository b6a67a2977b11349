"""Metrics from scores: additive sums that shards can add up, then loss, accuracy and accuracy per class; and a
run's metrics.csv read back as numbers."""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv as numbers (empty cells left out); a file that is not such a table (text
    in a cell, a row longer than the header) is a one-line UserError naming it."""
    try:
        with open(path, newline="") as fh:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    except (OSError, ValueError, TypeError, csv.Error) as exc:  # TypeError: the extra cells of a long row
        raise UserError(f"{path} is not a metrics table written by `mnist train` ({exc})") from None


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Additive statistics of a batch of scores, float64 ``(1 + 2C,)``: summed loss, hits per class, count
    per class. Sums from shards (processes, chunks) add up to the sums of the whole set."""
    num_classes = num_classes or logits.shape[1]
    labels = labels.to(logits.device)
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum").double().reshape(1)
    hit = logits.argmax(dim=1).eq(labels)
    hits = torch.bincount(labels[hit], minlength=num_classes).double()
    totals = torch.bincount(labels, minlength=num_classes).double()
    return torch.cat([loss_sum, hits, totals])


def metrics_from_sums(sums: torch.Tensor) -> dict[str, Any]:
    """Mean cross-entropy, accuracy in percent, and accuracy per class (percent; None for a class without images,
    which JSON writes as null: NaN is not JSON, and a strict reader such as jq refuses it)."""
    sums = sums.cpu()
    c = (len(sums) - 1) // 2
    hits, totals = sums[1 : 1 + c], sums[1 + c :]
    n, correct = int(totals.sum()), int(hits.sum())
    return {
        "accuracy": 100.0 * correct / n if n else float("nan"),
        "loss": float(sums[0]) / n if n else float("nan"),
        "correct": correct,
        "n": n,
        "per_class_accuracy": [100.0 * h / t if t else None for h, t in zip(hits.tolist(), totals.tolist())],
    }


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> dict[str, Any]:
    """Metrics of a whole set's scores. ``logits`` may also be log-probabilities (an ensemble's log of mean
    probabilities): the cross-entropy is then the ensemble's loss."""
    return metrics_from_sums(metric_sums(logits, labels, num_classes))


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts; rows are true classes, columns predictions."""
    flat = labels.to(torch.int64).cpu() * num_classes + pred.to(torch.int64).cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (``z`` = 1.96) Wilson score interval of an accuracy of ``correct`` of ``n``, in percent: how far
    the test set's sampling alone could move it. Wilson's, not p +- z se, which collapses to a width of 0 at 100 %
    and leaves [0, 100] near its ends."""
    if n <= 0:
        return 0.0, 100.0
    p, shrink = correct / n, 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def clearly_below(best: float, final: float, n: int) -> bool:
    """Whether accuracy ``final`` (%) is clearly below ``best`` (%), both measured on the same ``n`` images:
    lower by more than half a point and by more than two standard errors of a difference of two
    proportions (sqrt(2 p (1 - p) / n) at their mean p), so a few images' noise on a small set never counts."""
    p = (best + final) / 200.0
    two_se = 200.0 * math.sqrt(2.0 * p * (1.0 - p) / max(n, 1))  # in percentage points
    return best - final > max(0.5, two_se)


def final_drop(rows: Sequence[dict[str, Any]], split: str, n: int) -> dict[str, Any] | None:
    """When the last epoch of ``rows`` (metrics.csv) scores clearly below the best earlier epoch on ``split``
    ('val' or 'test', ``n`` images), the two epochs and their accuracies; else None."""
    key = f"{split}_accuracy"
    if len(rows) < 2:
        return None
    best = max(rows[:-1], key=lambda r: r[key])
    final = rows[-1]
    if not clearly_below(best[key], final[key], n):
        return None
    return {"split": split, "best_epoch": best["epoch"], "best_accuracy": best[key],
            "final_epoch": final["epoch"], "final_accuracy": final[key]}
