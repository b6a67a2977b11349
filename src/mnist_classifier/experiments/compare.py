"""``compare``: finished runs and sweeps side by side. Runs that share every setting but the seed form one
group, shown as mean ± sd; the table's columns are exactly the settings that differ between groups."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import fileio
from ..config import TrainConfig
from ..evaluation.metrics import read_metrics
from ..errors import UserError
from ..runs import SWEEP_FILE, TRIAL_FILE
from .report import mean_sd
from .search import SweepSpec, load_spec

# Settings that say where or how a run happened (role "run", and the data's folder), not what it computed:
# never a reason to tell runs apart.
IGNORED = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["role"] == "run") + ("data_dir",)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # config.json's "train"
    rows: list[dict[str, Any]]  # metrics.csv, numbers as floats
    summary: dict[str, Any] | None  # summary.json (None for a pruned or unfinished run)
    state: str  # complete, pruned, failed or unfinished
    sweep: str = ""  # the sweep folder it belongs to, if any


@dataclass
class Group:
    flags: dict[str, Any]  # the differing settings' values
    runs: list[Run] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float | None, float | None]:
        return mean_sd([r.summary[key] for r in self.runs if r.summary and r.summary.get(key) is not None])

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.flags)
        states = sorted({r.state for r in self.runs})
        out.update({"runs": len(self.runs), "state": "/".join(states)})
        for key in ("val_accuracy", "test_accuracy", "test_loss", "train_seconds"):
            mean, sd = self.stat(key)
            out[key] = None if mean is None else round(mean, 4)
            out[f"{key}_sd"] = None if sd is None else round(sd, 4)
        params = {r.summary["params"] for r in self.runs if r.summary}
        out["params"] = params.pop() if len(params) == 1 else None
        return out


@dataclass
class Comparison:
    flags: list[str]  # settings that differ between runs (the seed aside)
    groups: list[Group]
    sweeps: dict[Path, SweepSpec]  # each sweep folder named, with its sweep.json
    pictures: list[Path] = field(default_factory=list)
    importance: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was left out, and why (one line each)

    def table(self) -> list[dict[str, Any]]:
        return [g.row() for g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        return {"flags": self.flags, "groups": self.table(), "pictures": [str(p) for p in self.pictures],
                "importance": self.importance, "notes": self.notes}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return read_metrics(path) if path.is_file() else []


def read_run(path: Path, sweep: str = "") -> Run:
    """A run folder's config, summary, trial state and metrics; a damaged file there is a one-line UserError."""
    summary_path, trial_path = path / "summary.json", path / TRIAL_FILE
    config = fileio.read_json(path / "config.json")
    summary = fileio.read_json(summary_path) if summary_path.is_file() else None
    trial = fileio.read_json(trial_path) if trial_path.is_file() else None
    try:
        config, state = config["train"], trial["state"] if trial is not None else (
            "complete" if summary else "unfinished")
        if not (isinstance(config, dict) and isinstance(summary, (dict, type(None))) and isinstance(state, str)):
            raise TypeError("a config, summary or trial state of the wrong kind")
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a run folder written by `mnist train` ({type(exc).__name__}: {exc})") from None
    return Run(path, config, _read_rows(path / "metrics.csv"), summary, state, sweep)


def collect(paths: list[str | Path]) -> tuple[list[Run], dict[Path, SweepSpec]]:
    """Every run named: a run folder, or a sweep folder (its trials' runs, and its spec). Every file is read
    here, so a damaged one is refused before anything is written. A run named twice (``a a``, ``./a a/``, or a
    sweep and one of its trials) counts once: two copies of one run would pass for two seeds, with a spread of 0."""
    runs, sweeps, seen, unstarted = [], {}, set(), 0
    for raw in paths:
        path = Path(raw)
        if (path / SWEEP_FILE).is_file():
            if path.resolve() not in seen:  # a sweep named twice: one spec (its runs are told apart below)
                seen.add(path.resolve())
                sweeps[path] = load_spec(path)
            named = [(p, str(path)) for p in sorted(path.glob("trial-*")) if (p / "config.json").is_file()]
            unstarted += sum(1 for p in path.glob("trial-*")  # a trial's record without a run: it never trained
                             if (p / TRIAL_FILE).is_file() and not (p / "config.json").is_file())
        elif (path / "config.json").is_file():
            named = [(path, "")]
        else:
            raise UserError(f"{path} is neither a run folder (config.json) nor a sweep folder (sweep.json)")
        for run_dir, sweep in named:
            if run_dir.resolve() not in seen:
                seen.add(run_dir.resolve())
                runs.append(read_run(run_dir, sweep))
    if not runs:
        why = (f"; {unstarted} trial folder{'s' * (unstarted != 1)} hold{'s' * (unstarted == 1)} only the record "
               f"(trial.json) of a trial that failed before it trained" if unstarted else " yet")
        raise UserError(f"nothing to compare: the folders hold no runs{why}")
    return runs, sweeps


def differing(runs: list[Run]) -> list[str]:
    """The settings, in TrainConfig's order, whose values are not the same in every run (seed aside)."""
    names = [n for n in TrainConfig.__dataclass_fields__ if n not in IGNORED and n != "seed"]
    default = TrainConfig().to_dict()
    return [n for n in names if len({json.dumps(r.config.get(n, default[n])) for r in runs}) > 1]


def compare(paths: list[str | Path]) -> Comparison:
    """Group the runs under ``paths`` by their differing settings (one group per setting, seeds pooled)."""
    runs, sweeps = collect(paths)
    flags = differing(runs)
    default = TrainConfig().to_dict()
    groups: dict[str, Group] = {}
    for run in runs:
        values = {n: run.config.get(n, default[n]) for n in flags}
        groups.setdefault(json.dumps(values, sort_keys=True), Group(values)).runs.append(run)
    ordered = list(groups.values())
    if any(g.stat("val_accuracy")[0] is not None for g in ordered):  # ranked on validation only, never on test
        ordered.sort(key=lambda g: -(g.stat("val_accuracy")[0] or -1.0))
    return Comparison(flags, ordered, sweeps)
