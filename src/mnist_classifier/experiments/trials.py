"""One sweep trial: the searched values laid over the sweep's fixed config, trained ``seeds`` times with ``fit``.

Each seed is an ordinary run folder (``trial-0007-seed0`` ...) with a ``trial.json`` beside its files. The
objective is the mean validation accuracy of the kept models; their test accuracy is recorded for the report
and never chooses, prunes or ranks anything.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from .. import fileio
from ..config import TrainConfig
from ..data import Splits
from ..device import follows_load
from ..errors import DivergedError, Interrupted, UserError
from ..runs import TRIAL_FILE
from ..training import Reporter, fit
from .space import Param

WORKER_ATTR = "worker"  # "host:pid" of the process running a trial: a dead local pid marks a trial to retry


def worker_id() -> str:
    """"host:pid" of this process, as recorded on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_here(worker: str) -> bool:
    """Whether ``worker`` (a ``worker_id``) was a process of this host that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's process: this one cannot tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


class PruningReporter(Reporter):
    """Hands each epoch's validation accuracy to Optuna and stops the run when the pruner says so.

    The epoch is already saved when ``epoch`` is called, so a pruned run's folder is whole (no summary.json).
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def epoch(self, row: dict[str, Any]) -> None:
        self.trial.report(row["val_accuracy"], row["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {row['epoch']}: validation accuracy {row['val_accuracy']:.2f}%")


def run_name(number: int, seed_index: int) -> str:
    return f"trial-{number:04d}-seed{seed_index}"


def trial_config(base: TrainConfig, values: dict[str, Any], seed_index: int, run_dir: Path) -> TrainConfig:
    """The config of one seed of one trial; a combination the fields' rules refuse raises UserError."""
    return dataclasses.replace(base, **values, seed=base.seed + seed_index, out=str(run_dir), overwrite=False,
                               log_every=10**9)


def same_point(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier complete trial at this trial's point: its runs, on the same seeds, are the ones this trial
    would train (a point another worker is training at this moment is trained twice)."""
    return next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.params == trial.params), None)


def repeat(trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> tuple[str, float | None]:
    """Complete ``trial`` with ``earlier``'s result, training nothing: the sampler learns the point's value again,
    and the report says which trial it repeats."""
    trial.set_user_attr("repeat_of", earlier.number)
    for key in ("val_accuracies", "test_accuracies"):
        trial.set_user_attr(key, earlier.user_attrs.get(key, []))
    return "complete", earlier.value


def _write_trial(run_dir: Path, trial: optuna.Trial, study: str, state: str, values: dict[str, Any],
                 extra: dict[str, Any]) -> None:
    if run_dir.is_dir():
        fileio.write_json(run_dir / TRIAL_FILE, {"study": study, "trial": trial.number, "state": state,
                                                "params": values, **extra})


def run_trial(trial: optuna.Trial, params: tuple[Param, ...], base: TrainConfig, seeds: int, splits: Splits,
              device: torch.device, sweep_dir: Path, study: str) -> tuple[str, float | None]:
    """Train the trial's point ``seeds`` times; returns ("complete", mean validation accuracy), ("pruned", None)
    or ("failed", None). Only the first seed reports to the pruner: a point is judged before it is repeated."""
    trial.set_user_attr(WORKER_ATTR, worker_id())
    values = {p.name: p.suggest(trial) for p in params}
    if (earlier := same_point(trial)) is not None:  # tpe and random may draw a listed point again
        return repeat(trial, earlier)
    vals, tests, secs, dirs = [], [], [], []
    for k in range(seeds):
        run_dir = sweep_dir / run_name(trial.number, k)
        dirs.append(run_dir.name)
        trial.set_user_attr("run_dirs", dirs)
        try:
            cfg = trial_config(base, values, k, run_dir)
            fileio.make_dir(run_dir, "run folder")
            # the policy's threads follow the load as in `mnist train`: a worker's share of the cores, other
            # workers counting as other work, until one finishes or a neighbour starts
            summary = fit(cfg, splits, device, run_dir, PruningReporter(trial) if k == 0 else Reporter(),
                          follow_load=follows_load(base.threads))
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("pruned_at", str(pruned))
            _write_trial(run_dir, trial, study, "pruned", values, {"reason": str(pruned)})
            return "pruned", None
        except Interrupted:  # Ctrl-C stops the sweep, not just this trial: the worker requeues its point
            _write_trial(run_dir, trial, study, "interrupted", values, {})
            raise
        except DivergedError as exc:  # a hopeless point: stopped early, as the pruner would have
            trial.set_user_attr("pruned_at", f"diverged: {exc}")
            _write_trial(run_dir, trial, study, "pruned", values, {"reason": f"diverged: {exc}"})
            return "pruned", None
        except UserError as exc:
            trial.set_user_attr("error", str(exc))
            _write_trial(run_dir, trial, study, "failed", values, {"error": str(exc)})
            return "failed", None
        vals.append(summary["val_accuracy"])
        tests.append(summary["test_accuracy"])
        secs.append(summary["train_seconds"])
        _write_trial(run_dir, trial, study, "complete", values, {"val_accuracy": summary["val_accuracy"],
                                                                 "test_accuracy": summary["test_accuracy"]})
    trial.set_user_attr("val_accuracies", vals)
    trial.set_user_attr("test_accuracies", tests)  # recorded for the report; never the objective
    trial.set_user_attr("train_seconds", secs)
    return "complete", statistics.fmean(vals)
