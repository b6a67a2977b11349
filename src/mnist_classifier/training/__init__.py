"""Stage 4 of the pipeline: training. ``fit(cfg, splits, device, run_dir)`` trains and writes a run folder.

``session.py`` sets a run up, ``epoch.py`` and ``step.py`` are the loop and its step, ``state.py`` the
checkpoints a run writes and resumes from, ``distributed.py`` the torchrun side.
"""

from .epoch import epoch_permutation, request_stop, stop_requests, train_epoch
from .fit import Reporter, check_config, fit
from .state import load_resume

__all__ = ["Reporter", "check_config", "epoch_permutation", "fit", "load_resume", "request_stop", "stop_requests",
           "train_epoch"]
