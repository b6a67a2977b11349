"""Evaluation: batched forward passes without autograd, and metrics computed from the scores."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = 1000, amp_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Logits ``(N, num_classes)`` float32 for normalised ``images`` ``(N, C, H, W)``, on the images' device.

    Evaluation needs no gradients, so batches can be much larger than in training. ``amp_dtype`` (bf16)
    runs the forward pass under autocast, as training did.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            chunks = [model(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else images.new_zeros((0, 0))


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> dict[str, Any]:
    """Mean cross-entropy, accuracy in percent, and accuracy per class (percent; NaN for an absent class).

    ``logits`` may also be log-probabilities (an ensemble's log of mean probabilities): the loss is the same.
    """
    num_classes = num_classes or logits.shape[1]
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels, reduction="mean").item()
    pred = logits.argmax(dim=1)
    hit = pred.eq(labels)
    per_class_total = torch.bincount(labels, minlength=num_classes)
    per_class_hit = torch.bincount(labels[hit], minlength=num_classes)
    per_class = (per_class_hit.double() * 100.0 / per_class_total.double()).tolist()
    n = int(labels.numel())
    correct = int(hit.sum().item())
    return {
        "accuracy": 100.0 * correct / n if n else float("nan"),
        "loss": loss,
        "correct": correct,
        "n": n,
        "per_class_accuracy": per_class,
    }


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Test loss, accuracy (percent) and per-class accuracy of ``model`` on normalised ``images``."""
    return metrics_from_logits(predict_logits(model, images, batch_size, amp_dtype), labels)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts; rows are true classes, columns predictions."""
    flat = labels.to(torch.int64).cpu() * num_classes + pred.to(torch.int64).cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def ensemble_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the mean of the members' softmax probabilities (the usual soft-vote ensemble)."""
    probs = torch.stack([F.softmax(x.float(), dim=1) for x in logits]).mean(0)
    return probs.clamp_min(1e-12).log()
