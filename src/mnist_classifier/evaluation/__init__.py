"""Stage 3 of the pipeline: scoring models on a test set (metrics, test-time augmentation, ensembles) and the
pictures of it. Training calls ``evaluate_model`` each epoch; ``mnist evaluate`` is ``evaluate_checkpoints``."""

from .checkpoints import EvalResult, MemberResult, checkpoint_scores, combine, evaluate_checkpoints
from .metrics import clearly_below, confusion_matrix, final_drop, metrics_from_logits
from .scoring import ensemble_log_probs, evaluate_model, predict_log_probs, predict_logits, shifted_views

__all__ = [
    "EvalResult", "MemberResult", "checkpoint_scores", "clearly_below", "combine", "confusion_matrix", "final_drop", "ensemble_log_probs",
    "evaluate_checkpoints", "evaluate_model", "metrics_from_logits", "predict_log_probs", "predict_logits",
    "shifted_views",
]
