"""Run folders: where a training run writes its config, metrics, summary and checkpoints."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__, fileio
from .errors import UserError

RUNS_ROOT = Path("runs")


RUN_FILES = ("config.json", "metrics.csv", "summary.json", "model.pt", "last.pt")  # what marks a folder as a run
# the pictures --plots and `mnist plot` draw into a run folder (evaluation/plots.py), by what each shows
PICTURES = {"samples": "samples.png", "predictions": "predictions.png", "curves": "curves.png",
            "confusion": "confusion.png", "mistakes": "mistakes.png"}
TRIAL_FILE = "trial.json"  # a sweep's record of the trial a run folder belongs to (experiments/trials.py)
SWEEP_FILE = "sweep.json"  # what marks a sweep folder: what it searches (experiments/search.py)
EVENTS = "events.out.tfevents.*"  # TensorBoard's (training/tracking.py): one per process that trains, one HPARAMS


def run_dir_path(out: str = "") -> Path:
    """``out`` if given, else ``runs/<YYYYmmdd-HHMMSS>`` (with a suffix if that already exists)."""
    if out:
        return Path(out).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, suffix = RUNS_ROOT / stamp, 2
    while path.exists():
        path = RUNS_ROOT / f"{stamp}-{suffix}"
        suffix += 1
    return path


def run_files(path: Path) -> list[Path]:
    """The files of the run in ``path``: what marks it, its pictures, its trial record and its TensorBoard events.
    Anything else in the folder is not the run's."""
    named = [path / name for name in (*RUN_FILES, *PICTURES.values(), TRIAL_FILE)]
    return [p for p in named if p.is_file()] + sorted(p for p in path.glob(EVENTS) if p.is_file())


def held_work(path: Path) -> str:
    """What ``path`` holds that another command's output must not mix with: "a run (model.pt)", "a sweep
    (sweep.json)", or "" for a folder that holds neither (or no folder)."""
    run = next((name for name in RUN_FILES if (path / name).exists()), "")
    if run:
        return f"a run ({run})"
    return f"a sweep ({SWEEP_FILE})" if (path / SWEEP_FILE).exists() else ""


@contextlib.contextmanager
def claimed_run_dir(out: str = "", overwrite: bool = False, resuming: bool = False) -> Iterator[Path]:
    """The run folder (``run_dir_path``), made if need be and held for this process alone while the block runs.

    A folder that already holds a run is refused, unless the run is being resumed, or ``overwrite`` asks for
    its files (``run_files``) to be removed first: no old checkpoint is left beside the new run's config, no old
    picture beside a run that draws none, and no old event file for TensorBoard to draw beside the new run's
    curves as if they were one run's. The hold is an flock on the folder itself: a second ``mnist train`` on it
    (the same --out, a --resume of a run still training, an --overwrite of one) is refused, where before the two
    wrote their files into one folder (checked before any file is removed). The kernel releases it when the
    process ends, even by SIGKILL. A folder made here that the block leaves empty (a setting refused before
    anything was written) is removed."""
    path = run_dir_path(out)
    made = not path.exists()
    fileio.make_dir(path, "run folder")
    with fileio.exclusive(path, wait=False) as held:
        if not held:
            raise UserError(f"{path} is being written by another mnist train; wait for it to finish, or choose "
                            "another --out")
        if (path / SWEEP_FILE).exists():  # its trials are its sub-folders; a run of its own would mix with them
            raise UserError(f"{path} holds a sweep ({SWEEP_FILE}); choose another --out")
        existing = [name for name in RUN_FILES if (path / name).exists()]
        if existing and not resuming:
            if not overwrite:
                raise UserError(f"{path} already holds a run ({existing[0]}); continue it with --resume {path}, "
                                f"choose another --out, or pass --overwrite to replace it")
            for file in run_files(path):
                file.unlink()
        try:
            yield path
        except BaseException:
            if made:
                with contextlib.suppress(OSError):  # not empty (a file was written): kept
                    path.rmdir()
            raise


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed process left mid-write (``.NAME.XXXX.tmp``); the real files are whole."""
    stale = list(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def latest_checkpoint(root: str | os.PathLike = RUNS_ROOT) -> Path:
    """The ``model.pt`` of the most recently modified run under ``root``."""
    candidates = sorted(Path(root).glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"no trained model found under {root}/; train one with `mnist train`, or pass --checkpoint PATH")
    return candidates[-1]


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Library versions and the machine, recorded in config.json so a run can be reproduced.

    Versions come from package metadata: importing torchvision just to read its version costs about a second.
    """
    return {
        "mnist_classifier": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _dist_version("torchvision"),
        "numpy": _dist_version("numpy"),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
