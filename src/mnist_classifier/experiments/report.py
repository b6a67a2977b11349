"""A sweep's result: its trials sorted with their state, the best point, and the command that reproduces it."""

from __future__ import annotations

import dataclasses
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config import TrainConfig, flag_name

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running"}
NOT_FLAGS = ("out", "overwrite", "recipe", "log_every")  # where a run goes and how it logs: not what it computes


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation: both None for no values, the sd None for one (a single run measures
    no spread; printed as 0 it looked like a result that repeats exactly)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def plus_minus(mean: float, sd: float | None, digits: int = 2) -> str:
    """``mean ± sd`` to ``digits`` decimal places; the mean alone where there is no sd (a single run)."""
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


@dataclass
class TrialRecord:
    number: int
    state: str
    params: dict[str, Any]
    value: float | None  # the objective: mean validation accuracy, %, of complete trials
    val_sd: float | None = None
    test_accuracy: float | None = None  # mean over seeds; reported, never used to choose
    test_sd: float | None = None
    train_seconds: float | None = None
    epochs_run: int = 0  # epochs the first seed trained (fewer than --epochs when pruned)
    note: str = ""
    run_dirs: list[str] = field(default_factory=list)

    def sort_key(self) -> tuple:
        rank = {"complete": 0, "pruned": 1, "running": 2, "failed": 3}[self.state]
        return rank, -(self.value if self.value is not None else -1.0), self.number


def _record(t: optuna.trial.FrozenTrial) -> TrialRecord:
    a = t.user_attrs
    _, val_sd = mean_sd(a.get("val_accuracies", []))
    test, test_sd = mean_sd(a.get("test_accuracies", []))
    secs = a.get("train_seconds")
    note = (a.get("pruned_at") or a.get("error") or ("retry of trial %d" % a["retry_of"] if "retry_of" in a else "")
            or ("repeats trial %d, not trained again" % a["repeat_of"] if "repeat_of" in a else ""))
    if t.state == TrialState.FAIL and not note:
        note = "its process died; the point was queued again"
    value = t.value if t.state == TrialState.COMPLETE else None  # Optuna gives a pruned trial its last report
    return TrialRecord(t.number, STATE_NAMES[t.state], dict(t.params), value, val_sd, test, test_sd,
                       round(statistics.fmean(secs), 2) if secs else None,
                       max(t.intermediate_values, default=0), note, list(a.get("run_dirs", [])))


def train_command(cfg: TrainConfig) -> str:
    """The ``mnist train`` line that trains ``cfg``: every field that differs from the defaults, as a flag."""
    defaults = TrainConfig()
    parts = ["mnist", "train"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in NOT_FLAGS or value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            parts.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
        else:
            parts += [flag_name(f.name), f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(parts)


@dataclass
class SweepResult:
    sweep_dir: str
    study: str
    storage: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    command: str  # reproduces the best trial's first seed

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in ("complete", "pruned", "failed", "running")}
        for t in self.trials:
            out[t.state] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"sweep_dir": self.sweep_dir, "study": self.study, "storage": self.storage, "trials": self.counts(),
                "best": None if best is None else {
                    "trial": best.number, "params": best.params, "val_accuracy": best.value, "val_sd": best.val_sd,
                    "test_accuracy": best.test_accuracy, "test_sd": best.test_sd, "command": self.command}}


HIDDEN = "***"  # what stands for a storage URL's password wherever the URL is printed or written


def redact(url: str) -> str:
    """A storage URL fit to print or write down: its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        return f"{scheme}{sep}{creds.split(':')[0]}:{HIDDEN}@{host}"
    return url


def lacks_password(url: str) -> bool:
    """Whether ``url`` is a redacted one, its password left out (sweep.json keeps the URL so)."""
    return f":{HIDDEN}@" in url


def without_password(url: str) -> str:
    """A redacted ``url`` with no password at all, for the driver to find one where libpq looks (PGPASSWORD,
    ~/.pgpass) instead of trying *** itself."""
    return url.replace(f":{HIDDEN}@", "@", 1)


def summarize(study: optuna.Study, spec: Any, sweep_dir: Path) -> SweepResult:
    """The trials that ran (not surplus, not queued), sorted: complete by objective, then pruned, then failed."""
    ran = [t for t in study.get_trials(deepcopy=False)
           if t.state != TrialState.WAITING and not t.user_attrs.get("surplus")]
    records = sorted((_record(t) for t in ran), key=TrialRecord.sort_key)
    best = records[0] if records and records[0].state == "complete" else None
    command = train_command(dataclasses.replace(spec.base, **best.params)) if best else ""
    storage = redact(spec.storage) if spec.storage else str(Path(sweep_dir) / "optuna.journal")
    return SweepResult(str(sweep_dir), spec.study, storage, records, best, command)
