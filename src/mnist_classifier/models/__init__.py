"""Stage 2 of the pipeline: the networks, by name, and the checkpoints that rebuild them.

Nothing here imports training: a checkpoint (``checkpoint.load_model``) rebuilds its model anywhere.
"""

from .checkpoint import load_model
from .config import ModelConfig
from .registry import MODELS, build_model, check_model, count_parameters

__all__ = ["MODELS", "ModelConfig", "build_model", "check_model", "count_parameters", "load_model"]
