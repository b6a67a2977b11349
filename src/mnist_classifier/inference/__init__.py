"""Stage 5 of the pipeline: using a trained model on new images (``predict``) and elsewhere (``export``)."""

from .predict import Prediction, classify, expand_paths, predict_files, to_prediction

__all__ = ["Prediction", "classify", "expand_paths", "predict_files", "to_prediction"]
