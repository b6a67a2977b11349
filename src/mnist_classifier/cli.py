"""The ``mnist`` command. It prints; everything it calls returns values, except the model server's supervisor
(``serving/workers.py``), which reports its workers' starts and restarts while it runs.

Errors the user can fix are raised as UserError and shown as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from . import __version__, fileio
from .config import DEVICES, EVAL_BATCH_SIZE, PRECISIONS, ServeConfig, TrainConfig, add_config_flags, config_from_args
from .data import DatasetInfo, ensure_mnist, load_configured, load_dataset, load_for, model_input, raw_dir, verify_mnist
from .device import autocast_dtype, follows_load, oversubscribed, select_device, set_threads
from .errors import Interrupted, UserError
from .evaluation import EvalResult, evaluate_checkpoints
from .experiments import SweepResult, SweepSpec, compare, default_val_size, lr_find, parse_space, sweep
from .experiments.lr_find import RULES
from .experiments.report import plus_minus
from .experiments.space import default_trials
from .experiments.search import PRUNERS, SAMPLERS, check_jobs, default_jobs, load_spec, with_storage
from .inference import expand_paths, predict_files
from .models import MODELS, ModelConfig, build_model, count_parameters, load_model
from .models.registry import CENTRED_ONLY, check_model
from .models import checkpoint, pooling
from .training import Reporter, check_config, fit, load_resume, request_stop
from . import runs
from .terminal import leave_broken_pipe
from .training import distributed


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (no usage block), still with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------------
# Progress printing


SIGPIPE = 13  # a writer whose reader left; its number on Linux and macOS (Windows has no SIGPIPE)


class ConsoleReporter:
    """A tqdm bar per epoch on a terminal; otherwise the guide's 'Loss:' line every ``log_every`` batches."""

    def __init__(self, batch_size: int, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.batch_size = batch_size
        self.bar = None
        self.n_train = 0

    def start(self, info: dict[str, Any]) -> None:
        self.n_train = info["n_train"]
        self._say(f"Using device: {info['device']} ({info['precision']})")
        evaluated = "Validation samples" if info.get("split") == "val" else "Test samples"
        self._say(f"Model parameters: {info['params']:,}  Training samples: {info['n_train']}  {evaluated}: "
                  f"{info['n_test']}")
        if info.get("world_size", 1) > 1:
            self._say(f"Processes: {info['world_size']} (global batch {self.batch_size}, "
                      f"{self.batch_size // info['world_size']} images per process per step)")
        if info["start_epoch"] > 1:
            self._say(f"Resuming at epoch {info['start_epoch']} of {info['epochs']}")

    def step(self, epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        if self.tty:
            if self.bar is None:
                # a terminal that reports no size (a pseudo-terminal nobody sized: `docker run -t`, scripts) got
                # no bar at all from tqdm, which then counts 0 rows; shutil falls back to 80 x 24 there
                size = shutil.get_terminal_size()
                self.bar = tqdm(total=n_batches, desc=f"Epoch {epoch}", unit="batch", leave=False, file=self.stream,
                                ncols=size.columns, nrows=size.lines)
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        elif loss is not None:
            seen = min((batch + 1) * self.batch_size, self.n_train)
            self._say(f"Epoch {epoch} [{seen:>6}/{self.n_train}] Loss: {loss:.6f}")

    def epoch(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        split = "val" if "val_loss" in row else "test"
        label = "Validation accuracy" if split == "val" else "Accuracy"
        self._say(f"Epoch {row['epoch']}: train loss {row['train_loss']:.4f}, {split} loss {row[f'{split}_loss']:.4f}, "
                  f"{label}: {row[f'{split}_accuracy']:.2f}% ({row['seconds']:.1f} s)")

    def _say(self, line: str) -> None:
        """One line of output. Where its reader left (``mnist train | head``) the write fails with EPIPE: the
        output then goes to /dev/null and the run stops after its step, saves its place and exits 141 (128 +
        SIGPIPE), as it does when its terminal closes. Before 2026-12-06 the error escaped the loop (status 141)
        and lost the epoch in flight; before the epochs start there is nothing to lose, so it still escapes."""
        try:
            print(line, file=self.stream, flush=True)
        except BrokenPipeError:
            if not request_stop(SIGPIPE):
                raise
            leave_broken_pipe(self.stream.fileno())


# ---------------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_data(args: argparse.Namespace) -> int:
    if args.dataset == "mnist":
        ensure_mnist(args.data_dir)
        files = verify_mnist(args.data_dir)
        print(f"MNIST is ready in {raw_dir(args.data_dir).resolve()}")
        for path in files.values():
            print(f"  {Path(path).name}: md5 ok")
        return 0
    splits = load_dataset(args.dataset, args.data_dir)
    info = splits.info
    print(f"{info.name} is ready: {len(splits.train_labels):,} training and {len(splits.test_labels):,} test images, "
          f"{info.channels}x{info.image_size}x{info.image_size}, {len(info.class_names)} classes "
          f"({', '.join(info.class_names)}); mean {list(info.mean)}, std {list(info.std)}")
    return 0


# What a resumed run must keep: the data it learns from and the network it trains.
RESUME_FIXED = ("dataset", "model", "preprocess", "image_size", "test_fraction", "val_size", "train_subset",
                "test_subset")


def _train_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to train with (recipe or resumed run, with the typed flags laid over it) and the resume payload."""
    base, resume = None, None
    if args.resume and (Path(args.resume) / runs.TRIAL_FILE).is_file():  # the sweep's study keeps its result
        sweep_dir = Path(args.resume).parent
        raise UserError(f"--resume {args.resume}: the folder is a trial of the sweep in {sweep_dir}, whose record of "
                        f"it would no longer match; continue the sweep with `mnist sweep --resume --out {sweep_dir}`, "
                        f"or train these settings into a new --out")
    if args.resume:
        base, resume = load_resume(args.resume)
        base = dataclasses.replace(base, out=str(args.resume))
        if not distributed.launched_by_torchrun() or os.environ.get("RANK", "0") == "0":
            runs.remove_stale_temps(args.resume)
    cfg = _flags_config(args, base)
    if resume is None:
        return cfg, None
    if str(Path(cfg.out)) != str(Path(args.resume)):
        raise UserError("--out cannot differ from --resume: a resumed run continues in its own folder")
    changed = [f"--{k.replace('_', '-')}" for k in RESUME_FIXED if getattr(cfg, k) != getattr(base, k)]
    if changed:
        raise UserError(f"--resume {args.resume}: {', '.join(changed)} cannot change in a resumed run (it trained "
                        f"{base.model} on {base.dataset}); start a new run with --out instead")
    # A run killed after its last epoch but before summary.json is finished by resuming it with no epochs left.
    finished = (Path(args.resume) / "summary.json").exists()
    if cfg.epochs < resume["epoch"] or (cfg.epochs == resume["epoch"] and finished):
        done = resume["epoch"]
        raise UserError(f"--resume {args.resume}: already trained {done} epoch{'s' * (done != 1)}; pass "
                        f"--epochs N with N > {done}")
    return cfg, resume


def _flags_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig the typed flags describe, laid over ``base``, else over --recipe, else the defaults."""
    if base is None and getattr(args, "recipe", ""):
        base = TrainConfig.from_recipe(args.recipe)
    return check_config(config_from_args(args, TrainConfig, base))


def _fit_or_explain(cfg: TrainConfig, splits, device: torch.device, run_dir: Path, reporter: Reporter,
                    resume: dict[str, Any] | None, ctx: distributed.DistContext) -> dict[str, Any]:
    """``fit``, with out-of-memory and a lost peer turned into one-line advice."""
    try:
        return fit(cfg, splits, device, run_dir, reporter, resume=resume, ctx=ctx,
                   follow_load=follows_load(cfg.threads))
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of memory on {device} with --batch-size {cfg.batch_size}: reduce --batch-size (e.g. to "
            f"{max(1, cfg.batch_size // 2)}, or 32 or 16, as the guide advises); the last checkpoint is in {run_dir}"
        ) from None
    except RuntimeError as exc:
        if not ctx.enabled:
            raise
        # a peer died or hung: collectives raise after --dist-timeout (or at once when the link breaks)
        raise UserError(f"rank {ctx.rank}: lost the other processes ({str(exc).strip().splitlines()[0][:160]}); "
                        f"resume with --resume {run_dir}") from None


def _set_threads(command: str, requested: int) -> None:
    set_threads(requested)
    if note := oversubscribed(requested, f"--threads {requested}"):
        print(f"mnist {command}: warning: {note}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    cfg, resume = _train_config(args)
    _set_threads("train", cfg.threads)
    ctx = distributed.SINGLE
    if distributed.launched_by_torchrun():
        ctx, device = distributed.setup(cfg.device, cfg.dist_timeout)
    else:
        device = select_device(cfg.device)
    try:
        # an flock lets one process fetch while the others wait
        splits = load_configured(cfg)
        # Only rank 0 makes and holds the run folder; the others learn its name.
        with (runs.claimed_run_dir(cfg.out, cfg.overwrite, resume is not None) if ctx.is_main
              else contextlib.nullcontext()) as made:
            run_dir = Path(ctx.broadcast(str(made) if ctx.is_main else None))
            summary = _train_in(run_dir, cfg, splits, device, resume, ctx)
            if ctx.is_main:
                _report_run(run_dir, summary, cfg, splits, device, resumed=resume is not None)
    finally:
        distributed.teardown(ctx)
    return 0


def _train_in(run_dir: Path, cfg: TrainConfig, splits, device: torch.device,  # noqa: ANN001 - Splits
              resume: dict[str, Any] | None, ctx: distributed.DistContext) -> dict[str, Any]:
    """``fit`` into ``run_dir``, with this process's console output."""
    reporter = ConsoleReporter(cfg.batch_size) if ctx.is_main else Reporter()
    if ctx.is_main and (note := border_warning(cfg.model, splits.info)):
        print(note, file=sys.stderr)
    if ctx.is_main and device.type == "cpu" and (note := pooling.unavailable_note()):
        print(note, file=sys.stderr)
    return _fit_or_explain(cfg, splits, device, run_dir, reporter, resume, ctx)


def _report_run(run_dir: Path, summary: dict[str, Any], cfg: TrainConfig, splits,  # noqa: ANN001 - Splits
                device: torch.device, resumed: bool = False) -> None:
    """The end of `mnist train`: the accuracy line, the pictures, the folder."""
    if "final_drop" in summary:
        print(final_drop_warning(summary["final_drop"]), file=sys.stderr)
    chosen = f" (epoch {summary['best_epoch']}, chosen on validation)" if "best_epoch" in summary else ""
    # a resumed run's loop time counts the epochs before the resume too; its total is this process's alone
    total = "this resumed process" if resumed else "total"
    print(f"Test accuracy: {summary['test_accuracy']:.2f}%{chosen}  (training loop {summary['train_seconds']:.1f} s, "
          f"{total} {summary['total_seconds']:.1f} s)")
    if cfg.plots:
        for path in _write_plots(run_dir, splits, device, "fp32"):
            print(f"Wrote {path}")
    print(f"Run folder: {run_dir}")


def border_warning(model: str, info: DatasetInfo) -> str | None:
    """One line when a model that drops the image border trains on data not prepared as MNIST's digits."""
    keeps = CENTRED_ONLY.get(check_model(model))
    if keeps is None or info.preprocess == "digit":
        return None
    return (f"warning: {model} drops the image border, made for centred digits; "
            f"{info.name}'s images fill the frame: --model {keeps} keeps it")


def final_drop_warning(drop: dict[str, Any]) -> str:
    """One line for a run whose last epoch scored clearly below an earlier one."""
    said = (f"warning: epoch {drop['final_epoch']} scored {drop['final_accuracy']:.2f}% on the "
            f"{'validation split' if drop['split'] == 'val' else 'test set'}, clearly below epoch "
            f"{drop['best_epoch']}'s {drop['best_accuracy']:.2f}%")
    if drop["split"] == "val":
        return f"{said}; the model kept is epoch {drop['best_epoch']}'s, chosen on validation"
    return (f"{said}; the test set may not choose a model, so the last one is kept: train with --val-size N to "
            f"keep the best epoch on a validation split")


def _write_plots(run_dir: Path, splits, device: torch.device, precision: str) -> list[Path]:
    from .evaluation.plots import run_plots  # matplotlib costs about a second to import; only plots need it

    model, info, _ = load_model(run_dir / "model.pt", device)
    test_x = model_input(splits.test_images, info.mean, info.std, device)
    return run_plots(run_dir, model, test_x, splits, autocast_dtype(precision, device))


def cmd_plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "model.pt").is_file():
        raise UserError(f"{run_dir} is not a run folder (no model.pt); pass the folder `mnist train` printed")
    device = select_device(args.device)
    splits = load_for(checkpoint.dataset_info(checkpoint.load(run_dir / "model.pt")), args.data_dir)
    for path in _write_plots(run_dir, splits, device, args.precision):
        print(f"Wrote {path}")
    return 0


def _print_evaluation(result: EvalResult, tta_shift: int) -> None:
    if len(result.members) > 1:
        for m in result.members:
            print(f"{m.checkpoint}: accuracy {m.accuracy:.2f}%  loss {m.loss:.4f}")
        print(f"Ensemble of {len(result.members)} (mean probabilities):")
    if tta_shift:
        print(f"Test-time augmentation: each prediction averages {result.tta_views} views shifted by up to {tta_shift} px")
    low, high = result.interval()
    print(f"Test loss: {result.loss:.4f}  Accuracy: {result.accuracy:.2f}% ({result.correct}/{result.n}; 95 % interval "
          f"{low:.2f}-{high:.2f}%, from the test set's size alone)")
    for name, acc in zip(result.class_names, result.per_class_accuracy):
        print(f"  {name:>12}: " + ("no test images" if acc is None else f"{acc:6.2f}%"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    result = evaluate_checkpoints(args.checkpoint, args.data_dir, device, args.tta_shift, args.batch_size,
                                  autocast_dtype(args.precision, device), test_subset=args.test_subset)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        _print_evaluation(result, args.tta_shift)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k <= 0:
        raise UserError(f"--top-k must be positive, got {args.top_k}")
    device = select_device(args.device)
    model, info, _ = load_model(args.checkpoint or runs.latest_checkpoint(), device)
    paths = expand_paths(args.paths)
    if not paths:
        raise UserError(f"no image files found in {', '.join(args.paths)}")
    predictions, errors = predict_files(paths, model, info, device, args.top_k, args.save_preprocessed)
    for pred in predictions:
        if args.json:
            print(json.dumps(pred.to_json()), flush=True)
        else:
            top = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in pred.top_k)
            print(f"{pred.path}: {pred.label} ({100 * pred.confidence:.1f}%)  top-{len(pred.top_k)}: {top}", flush=True)
        if pred.low_confidence:
            print(f"mnist predict: warning: {pred.path}: low confidence ({100 * pred.confidence:.0f}%); "
                  "the image may not look like the images the model was trained on", file=sys.stderr)
    for path, message in errors:
        print(f"mnist predict: error: {path}: {message}", file=sys.stderr)
    return 1 if errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .inference.export import export  # onnx and safetensors are the export extra; only export needs them

    if args.out:
        fileio.check_writable(args.out)  # before the export (seconds for ONNX), not after it
    print(f"Wrote {export(args.checkpoint, args.format, args.out)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.workers import serve  # FastAPI and uvicorn are the serve extra; only serve needs them

    cfg = config_from_args(args, ServeConfig)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mnist serve: warning: listening on {cfg.host}, reachable from other machines", file=sys.stderr)
    serve(cfg)
    return 0


def print_trial(event: dict[str, Any]) -> None:
    """One line per finished trial, on stderr (stdout is kept for the report or --json); runs in sweep workers."""
    params = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in event["params"].items())
    value = f" val {event['value']:.2f}%" if event["value"] is not None else ""
    said = (f"repeats trial {event['repeat_of']}, not trained again" if "repeat_of" in event
            else f"{event['seconds']:.1f} s")
    print(f"trial {event['trial']} {event['state']}{value}  {params}  ({said})", file=sys.stderr, flush=True)


def _sweep_spec(args: argparse.Namespace) -> SweepSpec:
    """The sweep the flags describe; with --resume and no --param, the one saved in the sweep folder."""
    saved = Path(args.out or "") / runs.SWEEP_FILE
    if args.resume and not args.param and saved.is_file():
        spec = with_storage(load_spec(saved.parent), args.storage)
        return dataclasses.replace(spec, trials=args.trials or spec.trials)
    cfg = dataclasses.replace(_flags_config(args), out="")  # --out names the sweep folder; each trial has its own
    if not cfg.val_size and "val_size" not in vars(args):  # unset (not an explicit 0): the default split
        cfg = dataclasses.replace(cfg, val_size=default_val_size(cfg.train_subset))
    params = parse_space(args.param)
    trials = args.trials or default_trials(params, args.sampler)
    return SweepSpec(params=params, base=cfg, trials=trials, sampler=args.sampler, pruner=args.pruner,
                     seeds=args.seeds, study=args.study, storage=args.storage)


def _print_sweep(result: SweepResult) -> None:
    names = sorted({k for t in result.trials for k in t.params})
    print(f"{'trial':>5}  {'state':<8}  {'val %':>13}  {'test %':>13}  {'epochs':>6}  " + "  ".join(f"{n:>12}" for n in names))
    for t in result.trials:
        val = plus_minus(t.value, t.val_sd) if t.value is not None else "-"
        test = plus_minus(t.test_accuracy, t.test_sd) if t.test_accuracy is not None else "-"
        cells = "  ".join(f"{_cell(t.params.get(n)):>12}" for n in names)
        print(f"{t.number:>5}  {t.state:<8}  {val:>13}  {test:>13}  {t.epochs_run:>6}  {cells}"
              + (f"  ({t.note})" if t.note else ""))
    counts = ", ".join(f"{n} {k}" for k, n in result.counts().items() if n)
    print(f"Trials: {counts}. Storage: {result.storage}")
    if result.best is None:
        print("No trial completed: each trial's reason is beside it above.")
        return
    best = result.best
    print(f"Best: trial {best.number}, validation accuracy {best.value:.2f}% (test {best.test_accuracy:.2f}%, "
          f"reported only): " + ", ".join(f"{k}={_cell(v)}" for k, v in best.params.items()))
    print(f"Reproduce: {result.command}")


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = _sweep_spec(args)
    jobs = args.jobs or default_jobs()
    check_jobs(jobs, spec)  # before the warning below: a refusal is one line
    if note := oversubscribed(min(jobs, spec.trials), f"--jobs {jobs}"):  # each a process with its torch and data
        print(f"mnist sweep: warning: {note}", file=sys.stderr)
    result = sweep(spec, args.out, jobs=jobs, resume=args.resume, on_trial=print_trial)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        _print_sweep(result)
    return 0 if result.best is not None else 1  # a sweep without a result failed, as a script should see


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.plots import write_comparison  # matplotlib costs about a second to import

    out = Path(args.out or runs.RUNS_ROOT / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    result = write_comparison(compare(args.paths), out)
    for note in result.notes:
        print(f"mnist compare: warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print((out / "compare.md").read_text(), end="")
    if result.importance:
        print("Importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in result.importance.items()))
    for path in result.pictures:
        print(f"Wrote {path}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .experiments.plots import lr_find_figure  # matplotlib costs about a second to import
    from .evaluation.plots import save_figure

    cfg = _flags_config(args)
    fileio.check_writable(args.plot)  # before the search, not after it
    device = select_device(cfg.device)
    _set_threads("lr-find", cfg.threads)
    splits = load_configured(cfg)
    result = lr_find(cfg, splits, device, args.start, args.end, args.steps, args.rule)
    plot = save_figure(lr_find_figure(result), args.plot)
    if result.warning:
        print(f"mnist lr-find: warning: {result.warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result.to_dict(), "plot": str(plot)}))
        return 0
    stop = f"the loss diverged at lr {result.stopped_at:.2g}" if result.stopped_at else "the loss never diverged"
    print(f"Range test: {len(result.lrs)} steps from lr {args.start:g}; {stop}")
    print(f"Suggested learning rate: {result.suggestion:.2g} (rule: {result.rule})")
    print(f"Wrote {plot}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name in sorted(MODELS):
        print(f"{name:<16} {count_parameters(build_model(ModelConfig(name=name))):>10,} parameters (MNIST input)")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnist", description="Train, evaluate and use MNIST digit classifiers.")
    parser.add_argument("--version", action="version", version=f"mnist-classifier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a model and write a run folder",
                       description="Train a model on MNIST (or --dataset ...). Defaults are the guide's: Adam, "
                                   "lr 0.001, batch 64, 5 epochs.")
    add_config_flags(p, TrainConfig)
    p.add_argument("--resume", metavar="DIR", default="",
                   help="continue the run in DIR from its last.pt (its saved config, with any flags you give laid over it)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test loss and accuracy of one checkpoint, or an ensemble of several")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH", help="model.pt file(s); several are averaged")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--data-dir", default="data", help="folder holding the data sets, e.g. MNIST/raw/ (default: data); "
                   "the data set itself is the one the checkpoint was trained on")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to compute (default: auto)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help=f"images per forward pass (default: {EVAL_BATCH_SIZE})")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="autocast dtype of the forward passes (default: fp32, the arithmetic predict, serve and the "
                        "ONNX export use, so all report the same accuracy; auto = bf16 where the hardware has it)")
    p.add_argument("--tta-shift", type=int, default=0, metavar="PX",
                   help="test-time augmentation: average each model's probabilities over the (2*PX+1)^2 copies of "
                        "every image shifted by whole pixels up to PX in each direction (default: 0, off)")
    p.add_argument("--test-subset", type=int, default=0, metavar="N",
                   help="score only the first N test images, as `mnist train --test-subset N` did (default: 0, all)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify your own images (files or folders)",
                       description="Classify image files (PNG, JPEG, BMP, GIF or WebP; up to 16 megapixels, grey, RGB or RGBA). "
                                   "Each image is prepared the way the checkpoint's data set was: for MNIST digits, "
                                   "cropped, scaled into 20x20, centred by centre of mass in 28x28, white on black; "
                                   "for other data sets, resized (Fashion-MNIST and KMNIST: light backgrounds inverted).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="model.pt (default: the newest run's)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to list per image (default: 3)")
    p.add_argument("--save-preprocessed", metavar="DIR", default=None,
                   help="also write each image the model saw (28x28 for MNIST), as PNG, into DIR")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to compute (default: auto)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write the model as ONNX or safetensors for deployment")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="model.pt to export")
    p.add_argument("--format", default="onnx", choices=("onnx", "safetensors"), help="output format (default: onnx)")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default: beside the checkpoint)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a drawing page and a prediction API over HTTP (FastAPI + uvicorn)")
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plot", help="write samples, predictions, curves, confusion and mistakes PNGs into a run folder")
    p.add_argument("--run", required=True, metavar="DIR", help="run folder written by `mnist train`")
    p.add_argument("--data-dir", default="data", help="folder holding the data sets (default: data); the run's own "
                   "data set is used")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to compute (default: auto)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast dtype (default: fp32)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("data", help="fetch and verify the MNIST files (or check another --dataset)")
    p.add_argument("--data-dir", default="data", help="folder to hold MNIST/raw/ (default: data)")
    p.add_argument("--dataset", default="mnist", help="mnist (fetched and MD5-checked), or another data set to load "
                   "and describe: fashion-mnist, kmnist, emnist-digits, emnist-letters, qmnist, cifar10, folder:PATH")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("sweep", help="search training settings with Optuna, chosen on a validation split",
                       description="Search any `mnist train` setting (--param NAME=SPEC, repeatable); every other "
                                   "train flag is fixed for all trials. Trials are chosen on --val-size images held "
                                   "out of the training set (default 5,000); test accuracy is reported, never used.")
    add_config_flags(p, TrainConfig, skip=("out", "overwrite"))
    p.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                   help="a setting to search: lr=log:1e-4..1e-1 (log range), dropout=0..0.5 (range), "
                        "batch_size=32,64,128 or optimizer=adam,sgd (values)")
    p.add_argument("--trials", type=int, default=0, help="trials to run in all (default: the grid's size for "
                   "--sampler grid, else 20, or fewer where listed values allow fewer points); on --resume, may be "
                   "raised")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="tpe (Bayesian), random, or grid (every "
                   "combination of listed values, in an order shuffled by --seed) (default: tpe)")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="stop trials early on epoch-level "
                   "validation accuracy: median, hyperband, or none (default: median)")
    p.add_argument("--seeds", type=int, default=1, help="runs per point, seeds --seed, --seed+1, ...; the "
                   "objective is their mean (default: 1)")
    p.add_argument("--jobs", type=int, default=0, help="worker processes on this machine, each with its share "
                   "of the cores (default: 0 = automatic: one per core that other work leaves free, at most 8)")
    p.add_argument("--storage", default="", metavar="URL", help="an Optuna RDB URL (postgresql://..., "
                   "sqlite:///...) to share the sweep across machines (default: a journal file in --out)")
    p.add_argument("--study", default="", help="study name in the storage (default: the --out folder's name); "
                   "workers on other machines join with the same --storage and --study")
    p.add_argument("--out", default="", metavar="DIR", help="sweep folder (default: sweeps/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out after a crash or kill")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="runs and sweeps side by side: a table of what differs, and pictures",
                       description="Compare run folders and sweep folders: a table of the settings that differ, "
                                   "with validation and test accuracy, loss, seconds and parameters (mean ± sd "
                                   "over runs that differ only in --seed), learning curves overlaid, accuracy "
                                   "against each setting, and for a sweep the settings' importance.")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP", help="run folders and sweep folders")
    p.add_argument("--out", default="", metavar="DIR", help="where to write compare.md, compare.csv and the PNGs "
                   "(default: runs/compare-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("lr-find", help="the learning-rate range test: a plot and a suggested --lr",
                       description="Train a fresh model for --steps steps while the learning rate grows "
                                   "exponentially from --start to --end; stop when the loss diverges; plot the "
                                   "loss against the rate and suggest one. Takes the train flags (model, "
                                   "optimizer, batch size, data); writes no checkpoint.")
    add_config_flags(p, TrainConfig, skip=("out", "overwrite", "lr", "epochs"))
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default: 1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (default: 10)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps at most (default: 200)")
    p.add_argument("--rule", default="steepest", choices=RULES, help="how to suggest: steepest (where the loss "
                   "falls fastest) or minimum/10 (a tenth of the rate at the lowest loss) (default: steepest)")
    p.add_argument("--plot", default="lr-find.png", metavar="FILE", help="where to write the plot (default: lr-find.png)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("models", help="list the models that --model accepts")
    p.set_defaults(func=cmd_models)
    return parser


def entry() -> int:
    """The ``mnist`` console script and ``python -m mnist_classifier``: :func:`main`, then a quicker exit.

    At exit the interpreter runs its cyclic garbage collector several times over every object alive,
    about a million once torch (and torch._dynamo, which torch.optim imports) are loaded: 0.6-0.9 s per
    command here. ``gc.freeze()`` moves them out of the collector's view first; objects are still freed
    as usual, so files, pipes and exit handlers behave the same. Only for a whole process: in-process
    callers of :func:`main` (tests) keep their garbage collection.

    When the reader of the output goes away (``mnist predict DIR | head``), the command stops quietly with
    status 141 (128 + SIGPIPE), as Unix tools do, instead of a BrokenPipeError traceback.
    """
    try:
        code = main()
    except BrokenPipeError:
        # stdout onto /dev/null: the interpreter's flush of stdout at exit must not raise the same error again
        leave_broken_pipe(sys.stdout.fileno())
        code = 128 + SIGPIPE  # 141: what a shell reports for a writer whose reader left
    gc.freeze()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        if str(exc):  # under torchrun rank 0 alone says it
            print(f"mnist {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except UserError as exc:
        print(f"mnist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mnist {args.command}: interrupted", file=sys.stderr)
        return 130
