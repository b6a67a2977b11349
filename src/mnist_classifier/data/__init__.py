"""Stage 1 of the pipeline: data sets as uint8 tensors, and the preparation of people's own images.

``load_dataset(name)`` gives ``Splits`` for every ``--dataset``; ``images`` turns files and pixels into model
inputs the same way for training, evaluation, prediction and serving; ``augment`` transforms whole batches on
the device. A new data set goes in ``registry.py`` (an ``IdxSet`` entry for MNIST-format files) or a module of
its own beside ``cifar.py``.
"""

from .decode import ImageError, open_image
from .images import IMAGE_SUFFIXES, model_input, normalize, prepare_image
from .info import DatasetInfo, Splits
from .registry import (DATASETS, check_name, ensure_mnist, load_configured, load_dataset, load_for, load_mnist, raw_dir,
                       verify_mnist)

__all__ = [
    "DATASETS", "IMAGE_SUFFIXES", "DatasetInfo", "ImageError", "Splits", "check_name", "ensure_mnist", "load_configured",
    "load_dataset", "load_for", "load_mnist", "model_input", "normalize", "open_image", "prepare_image", "raw_dir", "verify_mnist",
]
