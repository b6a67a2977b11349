"""Pictures of experiments, as matplotlib Figures (built without pyplot, like ``evaluation.plots``): the lr
range test's curve, learning curves of runs overlaid, a sweep's accuracy against each parameter, and the
parameters' importance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import fileio
from ..errors import UserError
from ..evaluation.plots import save_figure
from ..runs import held_work
from .compare import Comparison, Group
from .lr_find import LRFindResult
from .report import plus_minus
from .search import SweepSpec, load_study
from .space import Param, is_log


def lr_find_figure(result: LRFindResult) -> Figure:
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="#bbbbbb", lw=0.8, label="batch loss")
    ax.plot(result.lrs, result.smoothed, color="#0969da", lw=1.8, label="smoothed")
    ax.axvline(result.suggestion, color="#cf222e", ls="--", label=f"suggested {result.suggestion:.2g} ({result.rule})")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if v == v and v != float("inf")]
    ax.set_ylim(0, 1.5 * max(finite[: max(1, len(finite) // 10)] or [1.0]))
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title="Learning-rate range test")
    ax.legend()
    return fig


def _label(group: Group) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in group.flags.items()) or "all runs"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def curves_figure(comparison: Comparison, max_groups: int = 12) -> Figure:
    """Accuracy and loss per epoch: each group's mean as a line, each of its seeds faintly behind it."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, group in enumerate(comparison.groups[:max_groups]):
        color = f"C{i % 10}"
        split = "val" if any("val_accuracy" in row for r in group.runs for row in r.rows) else "test"
        for ax, key in ((acc_ax, f"{split}_accuracy"), (loss_ax, f"{split}_loss")):
            series = [[row[key] for row in r.rows if key in row] for r in group.runs]
            for s in series:
                ax.plot(range(1, len(s) + 1), s, color=color, alpha=0.25, lw=0.8)
            longest = max((len(s) for s in series), default=0)
            mean = [sum(s[e] for s in series if len(s) > e) / sum(len(s) > e for s in series) for e in range(longest)]
            ax.plot(range(1, longest + 1), mean, color=color, lw=2, marker="o", ms=3,
                    label=_label(group) if ax is acc_ax else None)
        acc_ax.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title=f"{split} accuracy per epoch")
        loss_ax.set(xlabel="epoch", ylabel=f"{split} loss", title=f"{split} loss per epoch")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole, even for one
    acc_ax.legend(fontsize=8)
    return fig


def params_figure(comparison: Comparison, searched: tuple[Param, ...] = ()) -> Figure:
    """Validation accuracy of every run against each differing setting (log axis where it is log-scaled),
    coloured by another setting that takes a few named values (the optimizer against lr, say); pruned runs
    as crosses at their last validation accuracy."""
    names = comparison.flags or ["seed"]
    fig = Figure(figsize=(4.2 * len(names), 3.9), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        values = sorted({_key(r.config.get(name)) for g in comparison.groups for r in g.runs})
        hue = next((n for n in names if n != name and isinstance(comparison.groups[0].flags.get(n), str)), None)
        hues = sorted({str(g.flags.get(hue)) for g in comparison.groups}) if hue else [""]
        for group in comparison.groups:
            color = f"C{hues.index(str(group.flags.get(hue))) % 10}" if hue else "#0969da"
            for run in group.runs:
                x = _position(run.config.get(name), values)
                if run.summary and "val_accuracy" in run.summary:
                    ax.plot(x, run.summary["val_accuracy"], "o", color=color, alpha=0.7)
                elif run.rows and "val_accuracy" in run.rows[-1]:
                    ax.plot(x, run.rows[-1]["val_accuracy"], "x", color=color)
        if hue:
            for i, h in enumerate(hues):
                ax.plot([], [], "o", color=f"C{i % 10}", label=f"{hue}={h}")
            ax.legend(fontsize=8)
        if isinstance(values[0], str):
            ax.set_xticks(range(len(values)), values)
        elif is_log(searched, name):
            ax.set_xscale("log")
        # listed values (a grid, or runs set by hand): tick exactly them; a searched range keeps matplotlib's
        # ticks, since its few trials' values may fall close together and their labels overprint each other
        ranged = any(p.name == name and p.is_range for p in searched)
        if not isinstance(values[0], str) and not ranged and len(values) <= 8:
            ax.set_xticks(values, [_short(v) for v in values], rotation=45)
            ax.minorticks_off()
        ax.set(xlabel=name, ylabel="validation accuracy (%)")
    fig.suptitle("Validation accuracy against each setting (o: complete, x: pruned)")
    return fig


def _key(value: Any) -> Any:
    return str(value) if isinstance(value, (str, bool)) else value


def _position(value: Any, values: list[Any]) -> Any:
    return values.index(_key(value)) if isinstance(_key(value), str) else value


def importance_figure(importance: dict[str, float]) -> Figure:
    fig = Figure(figsize=(6, 0.6 * len(importance) + 1.4), layout="constrained")
    ax = fig.subplots()
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names], color="#0969da")
    ax.set(xlabel="share of the validation accuracy's variance (fANOVA)", title="Which setting matters")
    return fig


def sweep_importance(spec: SweepSpec, sweep_dir: Path) -> dict[str, float]:
    """fANOVA importance of each searched parameter for the validation accuracy of the sweep's complete
    trials (Optuna's FanovaImportanceEvaluator); empty when too few trials completed to tell."""
    if len(spec.params) < 2:  # one parameter explains everything by definition
        return {}
    study = load_study(spec, sweep_dir)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        return {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError):  # every complete trial has the same value, or one parameter value only
        return {}


def write_comparison(comparison: Comparison, out: Path) -> Comparison:
    """compare.csv and compare.md (the table), curves.png, params.png and, for a sweep, importance.png."""
    if held := held_work(out):  # a run's own curves.png would be replaced by the comparison's
        raise UserError(f"{out} holds {held}; a comparison goes into a folder of its own: choose another --out")
    fileio.make_dir(out, "comparison folder")
    table = comparison.table()
    fileio.write_csv(out / "compare.csv", table)
    fileio.write_text(out / "compare.md", markdown_table(table))
    pictures = [save_figure(curves_figure(comparison), out / "curves.png")]
    specs = list(comparison.sweeps.values())
    if comparison.flags:
        searched = tuple(p for spec in specs for p in spec.params)
        pictures.append(save_figure(params_figure(comparison, searched), out / "params.png"))
    if len(specs) == 1:
        try:  # the table and curves come from the sweep folder; only the importance needs its storage
            comparison.importance = sweep_importance(specs[0], next(iter(comparison.sweeps)))
        except UserError as exc:
            comparison.notes.append(f"importance.png left out: {exc}")
        if comparison.importance:
            pictures.append(save_figure(importance_figure(comparison.importance), out / "importance.png"))
    comparison.pictures = pictures
    return comparison


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table: mean ± sd columns folded together."""
    if not table:
        return ""
    keys = [k for k in table[0] if not k.endswith("_sd")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in table:
        cells = []
        for k in keys:
            v, digits = row[k], 4 if "loss" in k else 1 if "seconds" in k else 2
            measured = f"{k}_sd" in row  # a mean over the group's runs, not a setting
            cells.append("-" if v is None else plus_minus(v, row[f"{k}_sd"], digits) if measured else _short(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
