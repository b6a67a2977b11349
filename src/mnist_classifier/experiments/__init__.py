"""Stage 5 of the pipeline: experiments. Many training runs, compared and chosen on a validation split.

``sweep`` (``search.py``) searches TrainConfig fields with Optuna (``space.py`` parses the search space, ``trials.py`` runs one
trial, ``report.py`` sorts the result), ``compare`` sets finished runs and sweeps side by side, and
``lr_find`` runs the learning-rate range test, and ``run_seeds`` trains one config over several seeds.
"""

from .compare import Comparison, compare
from .lr_find import LRFindResult, lr_find
from .repeat import SeedRuns, run_seeds
from .report import SweepResult, TrialRecord, train_command
from .space import Param, parse_space
from .search import SweepSpec, default_val_size, sweep

__all__ = ["Comparison", "LRFindResult", "Param", "compare", "lr_find", "run_seeds", "SeedRuns", "SweepResult", "SweepSpec", "TrialRecord", "default_val_size", "parse_space", "sweep",
           "train_command"]
