"""``mnist evaluate`` as a library call: one checkpoint or an ensemble, with or without test-time augmentation.

    result = evaluate_checkpoints(["runs/a/model.pt", "runs/b/model.pt"], tta_shift=1)
    result.accuracy, result.correct, result.members[0].accuracy

Scores are computed in fp32 unless asked otherwise, so the figure equals what ``predict``, ``serve`` and the
ONNX export give for the same model and images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ..config import EVAL_BATCH_SIZE
from ..data import DatasetInfo, Splits, load_for, model_input
from ..errors import UserError
from ..models import load_model
from .metrics import metrics_from_logits, wilson_interval
from .scoring import ensemble_log_probs, predict_log_probs, predict_logits

MAX_TTA_SHIFT = 3  # pixels; (2*3+1)^2 = 49 views is already 49 forward passes per image


@dataclass
class Metrics:
    """One model's (or one ensemble's) test-set figures."""

    accuracy: float  # percent
    loss: float  # mean cross-entropy (of the log of mean probabilities, for an ensemble or TTA)
    correct: int
    n: int
    per_class_accuracy: list[float | None]  # percent, in class order (None for a class without test images)

    def interval(self) -> tuple[float, float]:
        """The accuracy's 95 % Wilson interval (percent): how far the test set's size alone could move it."""
        return wilson_interval(self.correct, self.n)


@dataclass
class MemberResult(Metrics):
    checkpoint: str = ""


@dataclass
class EvalResult(Metrics):
    """What ``evaluate_checkpoints`` returns: the ensemble's figures (the only member's, for one checkpoint)."""

    class_names: list[str] = field(default_factory=list)
    tta_views: int = 1  # forward passes averaged per image and model
    members: list[MemberResult] = field(default_factory=list)
    predictions: torch.Tensor | None = None  # (N,) int64 predicted class per test image

    def wrong_indices(self, labels: torch.Tensor) -> list[int]:
        """Test-set indices the (ensemble) prediction gets wrong."""
        assert self.predictions is not None
        return self.predictions.ne(labels.cpu()).nonzero().flatten().tolist()

    def to_dict(self) -> dict[str, Any]:
        """The JSON that ``mnist evaluate --json`` prints (members only for an ensemble)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("members", "predictions")}
        out["accuracy_ci95"] = [round(bound, 4) for bound in self.interval()]
        if len(self.members) > 1:
            out["ensemble_of"] = len(self.members)
            out["members"] = [asdict(m) for m in self.members]
        else:
            out["checkpoint"] = self.members[0].checkpoint
        return out


def checkpoint_scores(
    model: torch.nn.Module, info: DatasetInfo, images: torch.Tensor, device: torch.device, tta_shift: int = 0,
    batch_size: int = EVAL_BATCH_SIZE, amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(N, classes)`` scores of raw uint8 ``images``: logits, or log-probabilities averaged over the shifted
    views when ``tta_shift`` > 0. Raw logits without TTA keep the loss exactly the one training reported."""
    to_input = lambda v: model_input(v, info.mean, info.std, device)  # noqa: E731
    if tta_shift:
        return predict_log_probs(model, images, to_input, tta_shift, batch_size, amp_dtype)
    return predict_logits(model, to_input(images), batch_size, amp_dtype)


def combine(scores: Sequence[torch.Tensor], labels: torch.Tensor, class_names: Sequence[str],
            paths: Sequence[str], tta_views: int = 1) -> EvalResult:
    """Each member's metrics and the soft-vote ensemble's (a single member is its own ensemble)."""
    labels = labels.to(scores[0].device)
    members = [MemberResult(**metrics_from_logits(s, labels), checkpoint=str(p)) for s, p in zip(scores, paths)]
    total = scores[0] if len(scores) == 1 else ensemble_log_probs(scores)
    return EvalResult(**metrics_from_logits(total, labels), class_names=list(class_names), tta_views=tta_views,
                      members=members, predictions=total.argmax(1).cpu())


def check_tta_shift(shift: int) -> None:
    if not 0 <= shift <= MAX_TTA_SHIFT:
        raise UserError(f"--tta-shift must be 0 (off) to {MAX_TTA_SHIFT} pixels, got {shift}")


def check_distinct(paths: Sequence[str | os.PathLike], models: Sequence[torch.nn.Module]) -> None:
    """Refuse two checkpoints with the same weights (one file named twice, or a run's model.pt beside its last.pt
    after its last epoch): their copies would be averaged and reported as an ensemble of two models."""
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        first = seen.setdefault(digest.hexdigest(), i)
        if first != i:
            raise UserError(f"{paths[i]} holds the same weights as {paths[first]}; an ensemble averages different "
                            f"models")


def evaluate_checkpoints(
    paths: Sequence[str | os.PathLike], data_dir: str | os.PathLike = "data", device: torch.device | str = "cpu",
    tta_shift: int = 0, batch_size: int = EVAL_BATCH_SIZE, amp_dtype: torch.dtype | None = None, splits: Splits | None = None,
    test_subset: int = 0,
) -> EvalResult:
    """Test-set figures of one checkpoint, or of several as a soft-vote ensemble, on the test set of the data
    set they were trained on (``splits`` if given, else loaded from ``data_dir``); its first ``test_subset``
    images only, when given."""
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if test_subset < 0:
        raise UserError(f"--test-subset must be 0 (all) or positive, got {test_subset}")
    check_tta_shift(tta_shift)
    device = torch.device(device)
    loaded = [load_model(p, device) for p in paths]
    info = loaded[0][1]
    for path, (_, other, _) in zip(paths, loaded):
        if (other.name, other.class_names) != (info.name, info.class_names):
            raise UserError(f"{path} was trained on {other.name}, but {paths[0]} on {info.name}; an ensemble needs one data set")
    check_distinct(paths, [model for model, _, _ in loaded])  # after: a member of another data set says so first
    splits = splits or load_for(info, data_dir)
    n = test_subset or len(splits.test_labels)
    scores = [checkpoint_scores(model, minfo, splits.test_images[:n], device, tta_shift, batch_size, amp_dtype)
              for model, minfo, _ in loaded]
    return combine(scores, splits.test_labels[:n], info.class_names, [str(p) for p in paths], (2 * tta_shift + 1) ** 2)
