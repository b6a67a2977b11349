"""A sweep's search space: ``--param`` specs parsed and checked against TrainConfig's own declarations.

    lr=log:1e-4..1e-1            a float range searched on a log scale
    dropout=0..0.5               a float range (an int field gives an int range)
    batch_size=32,64,128         a list of values (what --sampler grid needs)
    optimizer=adam,sgd,rmsprop   a list of choices
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import typing
from dataclasses import dataclass
from typing import Any

import optuna

from ..config import TrainConfig, field_meta, flag_name, parse_value
from ..errors import UserError

# Fields a sweep may not vary: the data (each worker loads it once for all its trials), where and how runs
# happen, and the seed (``--seeds K`` repeats every point instead).
NOT_SWEPT_ROLES = ("data", "run")


@dataclass(frozen=True)
class Param:
    """One searched field: either ``values`` (a list) or ``low``..``high`` (``log``: searched on a log scale)."""

    name: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return not self.values

    def spec(self) -> str:
        """The ``--param`` text that gives this Param back."""
        if self.values:
            return f"{self.name}={','.join(str(v).lower() if isinstance(v, bool) else str(v) for v in self.values)}"
        return f"{self.name}={'log:' if self.log else ''}{self.low:g}..{self.high:g}"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.values:
            return trial.suggest_categorical(self.name, list(self.values))
        if _kind(self.name) is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def _kind(name: str) -> type:
    return typing.get_type_hints(TrainConfig)[name]


def sweepable() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.metadata["role"] not in NOT_SWEPT_ROLES and f.name not in ("seed", "recipe")]


def parse_param(text: str) -> Param:
    """One ``--param NAME=SPEC``; every value and both ends of a range are checked against the field's bounds."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not spec:
        raise UserError(f"--param {text!r}: expected NAME=SPEC, e.g. lr=log:1e-4..1e-1 or batch_size=32,64,128")
    if name not in sweepable():
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        why = ("it decides the data or where the run happens, so it is fixed for the whole sweep: pass it as a flag"
               if name in known else f"choose one of {', '.join(sweepable())}")
        raise UserError(f"--param {name}: cannot be searched; {why}" if name in known
                        else f"--param {name}: unknown parameter; {why}")
    log = spec.startswith("log:")
    body = spec.removeprefix("log:")
    if ".." in body:
        return _range(name, body, log)
    if log:
        raise UserError(f"--param {text!r}: log: goes with a range LOW..HIGH")
    values = tuple(dict.fromkeys(parse_value(TrainConfig, name, v.strip()) for v in body.split(",")))
    if len(values) < 2:
        raise UserError(f"--param {text!r}: one value is not a search; fix it with {flag_name(name)} {values[0]} instead")
    return Param(name, values=values)


def _range(name: str, body: str, log: bool) -> Param:
    kind, meta = _kind(name), field_meta(TrainConfig, name)
    if kind not in (int, float) or meta["choices"]:
        raise UserError(f"--param {name}: a range needs a number; list the values instead, e.g. {name}=a,b")
    low_text, _, high_text = body.partition("..")
    low, high = (parse_value(TrainConfig, name, t.strip()) for t in (low_text, high_text))
    if not low < high:
        raise UserError(f"--param {name}={body}: the range must run from low to high")
    if log and low <= 0:
        raise UserError(f"--param {name}=log:{body}: a log range must start above 0")
    return Param(name, low=low, high=high, log=log)


def parse_space(texts: list[str]) -> tuple[Param, ...]:
    """The search space of ``--param`` texts; none at all is one point (the fixed config, repeated by --seeds)."""
    params = tuple(parse_param(t) for t in texts)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise UserError(f"--param: {', '.join(sorted({n for n in names if names.count(n) > 1}))} given twice")
    return params


def grid(params: tuple[Param, ...], shuffle_seed: int | None = None) -> list[dict[str, Any]]:
    """Every combination of the listed values: in the order given (the first --param varies slowest), or
    shuffled by ``shuffle_seed``. A sweep runs its grid shuffled, so that the first trials, which the pruner
    compares later ones with, are a fair sample rather than, say, all of the smallest learning rates."""
    ranges = [p.name for p in params if p.is_range]
    if ranges:
        raise UserError(f"--sampler grid needs lists of values, not ranges: {', '.join(ranges)} (e.g. lr=0.0003,0.001,0.003)")
    points = [dict(zip([p.name for p in params], combo)) for combo in itertools.product(*(p.values for p in params))]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(points)
    return points


def grid_size(params: tuple[Param, ...]) -> int:
    return math.prod(len(p.values) for p in params)


def finite_size(params: tuple[Param, ...]) -> int | None:
    """How many points the space has when every parameter lists its values; None when one is a range."""
    return None if any(p.is_range for p in params) else grid_size(params)


def default_trials(params: tuple[Param, ...], sampler: str) -> int:
    """--trials left out: every point of a grid; otherwise 20, or every point of a smaller listed space, since
    a trial past them repeats a point, and its runs, with the same seeds."""
    if not params:
        return 1
    if sampler == "grid":
        return len(grid(params))  # which refuses a range in one line
    return min(20, finite_size(params) or 20)


def is_log(params: tuple[Param, ...], name: str) -> bool:
    """Whether ``name`` is best plotted on a log axis: searched on a log range in ``params``, or declared
    log-scaled (lr, batch size)."""
    found = next((p for p in params if p.name == name), None)
    return bool(found and found.log) or bool(field_meta(TrainConfig, name).get("log"))
