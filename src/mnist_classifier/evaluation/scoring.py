"""Scoring a model on a whole set of images: batched forward passes without autograd, shift test-time
augmentation, and the soft-vote of an ensemble. Training scores each epoch with ``evaluate_model``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EVAL_BATCH_SIZE
from .metrics import confusion_matrix, metric_sums, metrics_from_sums


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE, amp_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Logits ``(N, num_classes)`` float32 for normalised ``images`` ``(N, C, H, W)``, on the images' device.

    Evaluation needs no gradients, so batches may be larger than in training. ``amp_dtype`` (bf16)
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


def shifted_views(images: torch.Tensor, radius: int) -> list[torch.Tensor]:
    """Every copy of ``images`` (N, C, H, W) moved by whole pixels (dy, dx) with ``|dy|, |dx| <= radius``,
    the uncovered border filled with 0 (the background before normalisation); ``(2 * radius + 1) ** 2``
    views, the unshifted one first. Shifting before normalising keeps the fill exact for any mean/std."""
    if radius < 0:
        raise ValueError(f"shift radius must be >= 0, got {radius}")
    h, w = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius))  # constant 0 works for uint8 and float alike
    offsets = sorted(((dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)),
                     key=lambda d: (d != (0, 0), d))
    # a view shifted down by dy shows, at row r, the input row r - dy: the window starts at radius - dy
    return [padded[..., radius - dy : radius - dy + h, radius - dx : radius - dx + w] for dy, dx in offsets]


def predict_log_probs(
    model: nn.Module, images: torch.Tensor, to_input: Callable[[torch.Tensor], torch.Tensor], shift: int = 0,
    batch_size: int = EVAL_BATCH_SIZE, amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-probabilities ``(N, num_classes)`` of raw ``images`` (N, C, H, W), averaged in probability over
    the ``(2 * shift + 1) ** 2`` one-pixel-step shifts of test-time augmentation (``shift=0``: the plain
    prediction). ``to_input`` normalises a view for the model (``data.model_input``)."""
    views = shifted_views(images, shift)
    return ensemble_log_probs([predict_logits(model, to_input(v), batch_size, amp_dtype) for v in views])


def evaluate_model(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE,
    amp_dtype: torch.dtype | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    confusion: bool = False,
) -> dict[str, Any]:
    """Test loss, accuracy (percent) and per-class accuracy of ``model`` on normalised ``images``; with
    ``confusion``, also the ``(C, C)`` int64 confusion matrix (rows true classes) from the same forward passes.

    ``reduce`` combines the statistics of this shard with the other processes' (a sum all-reduce), so each
    process can evaluate only its share of the images.
    """
    reduce = reduce or (lambda t: t)
    logits = predict_logits(model, images, batch_size, amp_dtype)
    result = metrics_from_sums(reduce(metric_sums(logits, labels)))
    if confusion:
        counts = confusion_matrix(logits.argmax(dim=1), labels, logits.shape[1]).to(logits.device, torch.float64)
        result["confusion"] = reduce(counts).round().to(torch.int64).cpu()
    return result


def ensemble_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the mean of the members' softmax probabilities (the usual soft-vote ensemble)."""
    probs = torch.stack([F.softmax(x.float(), dim=1) for x in logits]).mean(0)
    return probs.clamp_min(1e-12).log()
