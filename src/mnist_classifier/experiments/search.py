"""``sweep``: an Optuna study over TrainConfig fields, kept in a storage so that it resumes and is shared.

The sweep folder holds ``sweep.json`` (what is searched, fixed once), the default storage
``optuna.journal``, and one run folder per trial and seed. Workers (``--jobs`` processes here, or the same
command on other machines with ``--storage URL``) take trials until exactly ``trials`` are complete, pruned
or running; a trial whose process died is marked failed and its point queued again, so a SIGKILL loses at
most the trial in flight and a finished trial never runs twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import torch
from optuna.trial import TrialState

from .. import fileio
from ..config import SEEDS, TrainConfig
from ..data import Splits, load_configured
from ..device import check_processes_fit, free_cores, select_device, threads_per_job
from ..errors import Interrupted, UserError
from ..runs import SWEEP_FILE, held_work
from ..supervision import follow_parent
from ..terminal import heeded_hangup, leave_hung_up_terminal
from ..training import stop_requests
from .report import SweepResult, lacks_password, redact, summarize, without_password
from .space import Param, finite_size, grid, grid_size, parse_param
from .trials import WORKER_ATTR, dead_here, run_trial

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_VAL_SIZE = 5000  # 1/12 of MNIST's training set: a validation accuracy with a standard error near 0.14 pt
SPEC_FILE = SWEEP_FILE
STORAGE_ATTEMPTS = 3
# bytes of memory a sweep worker keeps to itself: 698-702 MB of private pages (smaps_rollup's Private_Dirty) in
# each worker of a --jobs 2 sweep of the guide CNN on MNIST (CPU-7, 2026-12-07); more for larger data or models
JOB_MEMORY = 800 * 2**20
STOP_WAIT_S = 30.0  # after Ctrl-C, how long a worker may take to finish its step and save before it is stopped
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # trials that take one of the --trials
# ... and so does a failed trial marked so: its training refused its point (a setting that does not fit the
# others, as --param model=... beside --pretrained), which would fail again. Left uncounted, such a sweep asked
# for trial after trial without end (5,344 in 30 s). A trial failed because its worker died or was stopped is
# not marked: its point is queued again.
FAILED_RUN = "failed_run"

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI reports trials itself


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep searches and how; saved as sweep.json and fixed for the sweep's life."""

    params: tuple[Param, ...]
    base: TrainConfig  # every field not searched, as flags and the recipe set it
    trials: int
    sampler: str = "tpe"
    pruner: str = "median"
    seeds: int = 1
    study: str = ""
    storage: str = ""  # an RDB URL, or "" for the journal file in the sweep folder; written without its password

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS or self.pruner not in PRUNERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)} and --pruner one of {', '.join(PRUNERS)}")
        if not 1 <= self.trials <= 100_000 or not 1 <= self.seeds <= 100:
            raise UserError(f"--trials must be 1-100000 and --seeds 1-100, got {self.trials} and {self.seeds}")
        if not self.base.val_size:
            raise UserError("a sweep chooses on a validation split: --val-size must be positive")
        if not self.params and self.trials != 1:
            raise UserError("without --param a sweep has one point: leave --trials out, and repeat it with --seeds K")
        if self.base.seed + self.seeds - 1 not in SEEDS:
            raise UserError(f"--seed {self.base.seed} with --seeds {self.seeds} would train seeds past the largest, "
                            f"{SEEDS.high:.0f}")
        if self.sampler == "grid" and grid_size(self.params) > self.trials:
            raise UserError(f"the grid has {grid_size(self.params)} points, more than --trials {self.trials}; "
                            f"raise --trials or list fewer values")
        if self.sampler == "grid":
            grid(self.params)  # raises for ranges

    def to_dict(self) -> dict[str, Any]:
        return {"params": [p.spec() for p in self.params], "trials": self.trials, "sampler": self.sampler,
                "pruner": self.pruner, "seeds": self.seeds, "study": self.study, "storage": redact(self.storage),
                "objective": "mean validation accuracy (%) of the kept models", "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        return cls(params=tuple(parse_param(p) for p in d["params"]), base=TrainConfig.from_dict(d["base"]),
                   trials=d["trials"], sampler=d["sampler"], pruner=d["pruner"], seeds=d["seeds"], study=d["study"],
                   storage=d["storage"])

    def same_search(self, other: "SweepSpec") -> bool:
        """Whether ``other`` searches the same thing (the trial count may grow on --resume)."""
        return dataclasses.replace(other, trials=self.trials).to_dict() == self.to_dict()


def with_storage(spec: SweepSpec, url: str) -> SweepSpec:
    """A saved ``spec`` with the whole storage URL given again by ``--storage`` (sweep.json and the study keep it
    without its password: the folder is readable by others and often copied); without one, the saved URL, whose
    password ``open_storage`` leaves to PGPASSWORD or ~/.pgpass."""
    if not url:
        return spec
    if redact(url) != redact(spec.storage):  # a sweep.json from before kept the whole URL
        saved = redact(spec.storage) or "its journal"
        raise UserError(f"--storage {redact(url)} is not this sweep's storage, {saved}")
    return dataclasses.replace(spec, storage=url)


def load_spec(sweep_dir: str | Path) -> SweepSpec:
    """The sweep.json of ``sweep_dir``; a damaged or foreign one is a one-line UserError naming it."""
    path = Path(sweep_dir) / SPEC_FILE
    saved = fileio.read_json(path)
    try:
        return SweepSpec.from_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a sweep written by `mnist sweep` ({type(exc).__name__}: {exc})") from None


def default_val_size(train_subset: int) -> int:
    return DEFAULT_VAL_SIZE if not train_subset else max(1, train_subset // 10)


def open_storage(url: str, sweep_dir: Path) -> optuna.storages.BaseStorage:
    """The journal file in the sweep folder by default; an RDB URL (sqlite:///, postgresql://) when given. A URL
    as sweep.json keeps it (user:***@) is opened with no password, which libpq then takes from PGPASSWORD or
    ~/.pgpass (a resumed sweep, compare's importance)."""
    if not url:
        fileio.make_dir(sweep_dir, "sweep folder")
        backend = optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))
        return optuna.storages.JournalStorage(backend)
    hint = ("; sweep.json keeps no password: pass --storage with the whole URL, or keep the password in PGPASSWORD "
            "or ~/.pgpass" if lacks_password(url) else "")
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(without_password(url), engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:  # sqlalchemy's errors: a bad URL, a missing driver, a server that does not answer
            # Workers started at once on an empty database race to create Optuna's tables, and PostgreSQL
            # refuses all but one (a unique violation in pg_type); the others find the tables on a retry.
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1) + random.random() * 0.5)
    raise UserError(f"--storage: cannot open {redact(url)}: {reason}{hint}")


def _sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    # Not seeded: a seeded sampler restarted by --resume, or started on a second machine, would draw the
    # points already tried again. Each trial's run is still reproducible (its seed is --seed + k).
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=min(10, max(2, spec.trials // 3)))
    return optuna.samplers.RandomSampler()  # grid points are queued in order; this draws nothing then


def _pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        # No pruning until 2 trials have finished (5 for sweeps of 50 or more), then a trial below the median
        # of the others at the same epoch stops. Replaying the 24-trial benchmark sweep in 3 shuffled orders:
        # 2 start-up trials cost 44-53 % of the unpruned CPU time, 5 cost 58-62 % (BENCHMARKS.md).
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, spec.trials // 10)))
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.base.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def load_study(spec: SweepSpec, sweep_dir: Path) -> optuna.Study:
    storage = open_storage(spec.storage, sweep_dir)
    try:
        study = optuna.create_study(study_name=spec.study, storage=storage, direction="maximize",
                                    sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True)
    except Exception as exc:  # the server went away between opening and creating
        raise UserError(f"--storage: cannot use {redact(spec.storage)}: {str(exc).splitlines()[0][:200]}") from None
    return study


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """One process of this machine at a time counts and takes trials (other machines rely on trial numbers)."""
    import fcntl  # POSIX only

    with open(sweep_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_shared(study: optuna.Study, spec: SweepSpec) -> None:
    """A study in a shared storage searches one space: a worker with another one is refused."""
    saved = study.user_attrs.get("spec")
    if saved is None:
        study.set_user_attr("spec", spec.to_dict())
    elif not SweepSpec.from_dict(saved).same_search(spec):
        raise UserError(f"study {spec.study!r} in the storage searches {', '.join(saved['params'])} with other "
                        f"settings; use another --study name")


def recover_dead(study: optuna.Study) -> list[int]:
    """Trials left running by a process of this host that is gone: marked failed, their points queued again."""
    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if dead_here(t.user_attrs.get(WORKER_ATTR, "")):
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            retried.append(t.number)
    return retried


def prepare(spec: SweepSpec, sweep_dir: Path, resume: bool) -> SweepSpec:
    """Check the folder against ``spec``, write sweep.json, create (or reopen) the study, queue the grid."""
    spec_path = sweep_dir / SPEC_FILE
    saved = None
    if spec_path.exists():
        saved = load_spec(sweep_dir)
        if not saved.same_search(spec):
            raise UserError(f"{sweep_dir} holds another sweep ({', '.join(p.spec() for p in saved.params)}); "
                            f"choose another --out")
        if not resume:
            raise UserError(f"{sweep_dir} already holds this sweep; continue it with --resume, or choose another --out")
    elif resume:
        raise UserError(f"--resume {sweep_dir}: no sweep there ({SPEC_FILE} is missing)")
    elif held := held_work(sweep_dir):  # a run folder: its files and the sweep's would pass for one another's
        raise UserError(f"{sweep_dir} holds {held}; choose another --out for the sweep")
    size = finite_size(spec.params)
    # for a new sweep, or --trials raised on --resume: one saved before with repeats still resumes and compares
    if size is not None and spec.trials > size and (saved is None or spec.trials > saved.trials):
        raise UserError(f"--trials {spec.trials} is more than the {size} point(s) the listed values allow; a trial "
                        f"past them repeats a point with the same seeds (--seeds K trains each point on K seeds)")
    study = load_study(spec, sweep_dir)  # an RDB --storage is reached before anything is written
    fileio.make_dir(sweep_dir, "sweep folder")
    with _locked(sweep_dir):
        _check_shared(study, spec)
        if not spec_path.exists() and spec.sampler == "grid" and not study.trials:
            for point in grid(spec.params, shuffle_seed=spec.base.seed):
                study.enqueue_trial(point)
        fileio.write_json(spec_path, spec.to_dict())
        recover_dead(study)
    return spec


def _take_trial(study: optuna.Study, spec: SweepSpec, sweep_dir: Path) -> optuna.Trial | None:
    """The next trial, or None once ``spec.trials`` are complete, pruned or running. Exact across processes
    here (the lock); across machines a trial numbered past the count is dropped as surplus."""
    with _locked(sweep_dir):
        if sum(map(_takes_one, study.get_trials(deepcopy=False))) >= spec.trials:
            return None
        trial = study.ask()
        ahead = [t for t in study.get_trials(deepcopy=False)
                 if t.number < trial.number and (_takes_one(t) or t.state == TrialState.WAITING)]
        if len(ahead) >= spec.trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return None
        return trial


def _takes_one(t: optuna.trial.FrozenTrial) -> bool:
    """Whether ``t`` took one of the --trials (``COUNTED``, ``FAILED_RUN``)."""
    return t.state in COUNTED or (t.state == TrialState.FAIL and bool(t.user_attrs.get(FAILED_RUN)))


TrialCallback = Callable[[dict[str, Any]], None]


@contextlib.contextmanager
def storage_answers(sweep_dir: Path) -> Iterator[None]:
    """A storage that stops answering mid-sweep (its database restarted, or unreachable) ends the sweep in one
    line instead of SQLAlchemy's traceback, which Optuna words as "invalid data in the commit". The trials that
    were running stay marked running; --resume finds their workers gone and runs their points again."""
    import sqlalchemy.exc  # Optuna's RDB storage is built on it

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        cause = exc.__cause__ or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise UserError(f"the sweep's storage stopped answering ({reason}); the trials that were running will run "
                        f"again; {_resume_hint(sweep_dir)} once it answers") from None


def work(sweep_dir: Path, worker: int = 0, threads: int = 0, on_trial: TrialCallback | None = None,
         storage: str = "") -> int:
    """One worker: load the data once, then take and run trials until there are none left; returns how many.
    ``storage``: the whole URL, which sweep.json keeps without its password."""
    spec = with_storage(load_spec(sweep_dir), storage)
    if threads:
        torch.set_num_threads(threads)
    study = load_study(spec, sweep_dir)
    device = select_device(spec.base.device)
    splits = load_configured(spec.base)
    done = 0
    with stop_requests() as stop:  # trial after trial: a stop between two is the next one's (StopFlag)
        while not stop.is_set() and (trial := _take_trial(study, spec, sweep_dir)) is not None:
            _run_and_tell(study, trial, spec, splits, device, sweep_dir, worker, on_trial)
            done += 1
        if stop.is_set():
            raise Interrupted(f"interrupted between trials; {_resume_hint(sweep_dir)}", stop.exit_status())
    return done


def _run_and_tell(study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, splits: Splits, device: torch.device,
                  sweep_dir: Path, worker: int, on_trial: TrialCallback | None) -> None:
    """Run one trial and tell the study how it went; one that was stopped goes back in the queue."""
    t0 = time.perf_counter()
    try:
        state, value = run_trial(trial, spec.params, spec.base, spec.seeds, splits, device, sweep_dir, spec.study)
    except Interrupted as stopped:
        trial.set_user_attr("error", "interrupted (Ctrl-C, SIGTERM or SIGHUP); the point was queued again")
        study.tell(trial, state=TrialState.FAIL)  # as --resume treats a trial whose worker died: tried again
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        raise Interrupted(f"interrupted in trial {trial.number}, which will run again; {_resume_hint(sweep_dir)}",
                          stopped.status) from None
    if state == "complete":
        study.tell(trial, value)
    else:
        if state == "failed":
            trial.set_user_attr(FAILED_RUN, True)
        study.tell(trial, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL)
    if on_trial is not None:
        repeat_of = {"repeat_of": n} if (n := trial.user_attrs.get("repeat_of")) is not None else {}
        on_trial({"trial": trial.number, "state": state, "value": value, "params": trial.params,
                  "seconds": round(time.perf_counter() - t0, 1), "worker": worker, **repeat_of})


def _resume_hint(sweep_dir: Path) -> str:
    return f"continue with: mnist sweep --resume --out {sweep_dir}"


def _spawned(sweep_dir: str, worker: int, threads: int, on_trial: TrialCallback | None, parent: int,
             storage: str) -> None:
    follow_parent(parent)  # a sweep killed outright: its workers stop as on SIGTERM, not train on unwatched
    try:
        with storage_answers(Path(sweep_dir)):
            work(Path(sweep_dir), worker, threads, on_trial, storage)
    except KeyboardInterrupt:  # the parent says how to continue
        sys.exit(128 + signal.SIGINT)
    except Interrupted as stopped:  # the status tells the parent, should it be this worker alone, a point is left
        sys.exit(stopped.status)
    except UserError as exc:  # one line, as the command itself would print it, not multiprocessing's traceback
        print(f"mnist sweep: worker {worker}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _wait_for(procs: list, sweep_dir: Path) -> None:
    """Join the worker processes. A terminal's Ctrl-C reaches them too; a SIGTERM sent to this process alone is
    passed on to them, and so is a SIGHUP (a closed terminal's reaches them too, but ``kill -HUP`` may not).
    Either way each worker stops after its step and saves (up to STOP_WAIT_S), then the sweep says how to
    continue."""
    received: list[int] = []

    def pass_on(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        if signum != signal.SIGTERM:
            leave_hung_up_terminal()  # the last line, how to continue, would raise EIO on a closed terminal
            if received:  # a closed terminal's job gets SIGHUP twice (its shell's, then the kernel's)
                return
        received.append(signum)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)
        raise KeyboardInterrupt

    # not where a signal was ignored when the sweep started: the sweep ignores it whole, as its workers do
    # (StopFlag), such as SIGTERM in a background job or SIGHUP under nohup
    stops = ([sig for sig in (signal.SIGTERM, heeded_hangup()) if sig is not None and
              signal.getsignal(sig) is not signal.SIG_IGN]
             if threading.current_thread() is threading.main_thread() else [])
    previous = {sig: signal.signal(sig, pass_on) for sig in stops}
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        received.append(signal.SIGINT)  # the first is the stop's (Ctrl-C where none came before)
        for p in procs:
            p.join(timeout=STOP_WAIT_S)
        raise Interrupted(f"interrupted; the trials that were running will run again; {_resume_hint(sweep_dir)}",
                          128 + received[0]) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def run_workers(sweep_dir: Path, jobs: int, threads: int, on_trial: TrialCallback | None, storage: str = "") -> None:
    """``jobs`` worker processes (or this process for one), each with ``threads`` torch threads (0: its share
    of the cores that other work leaves free, measured once before they start). ``storage`` reaches them
    through spawn's pipe, not their command line, where ``ps`` would show its password."""
    threads = threads or threads_per_job(jobs)
    if jobs == 1:
        work(sweep_dir, 0, threads, on_trial, storage)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch thread pools
    procs = [ctx.Process(target=_spawned, args=(str(sweep_dir), i, threads, on_trial, os.getpid(), storage))
             for i in range(jobs)]
    for p in procs:
        p.start()
    try:
        _wait_for(procs, sweep_dir)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise UserError(f"{len(failed)} of {jobs} sweep workers failed (exit {failed[0]}); continue with --resume")


def check_jobs(jobs: int, spec: SweepSpec) -> None:
    """Refuse a --jobs below 1, or more worker processes than the memory holds (each loads torch and the data)."""
    if jobs < 1:
        raise UserError(f"--jobs must be 0 (one worker per free core) or more, got {jobs}")
    check_processes_fit(min(jobs, spec.trials), JOB_MEMORY, "--jobs", "jobs")


def sweep(spec: SweepSpec, out: str | Path = "", jobs: int = 1, resume: bool = False,
          on_trial: TrialCallback | None = None) -> SweepResult:
    """Run (or continue, or join) the sweep ``spec`` in the folder ``out`` with ``jobs`` worker processes here
    (no more than its trials); return its result."""
    check_jobs(jobs, spec)
    sweep_dir = Path(out) if out else Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")
    if not spec.study:
        spec = dataclasses.replace(spec, study=sweep_dir.resolve().name)
    with storage_answers(sweep_dir):  # here; a spawned worker has its own (_spawned)
        spec = prepare(spec, sweep_dir, resume)
        try:
            run_workers(sweep_dir, max(1, min(jobs, spec.trials)), spec.base.threads, on_trial, spec.storage)
        except KeyboardInterrupt:  # outside a trial's epochs (loading the data, between trials): nothing to save
            raise Interrupted(f"interrupted; {_resume_hint(sweep_dir)}") from None
        return summarize(load_study(spec, sweep_dir), spec, sweep_dir)


def default_jobs() -> int:
    """One single-threaded worker per free core, at most 8 (BENCHMARKS.md: two 1-thread jobs on 2 cores
    complete more trials an hour than one 2-thread job); workers never outnumber the free cores."""
    return max(1, min(8, free_cores()))
