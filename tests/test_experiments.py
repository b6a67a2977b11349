"""Experiments: sweeps (resume after SIGKILL, pruning, a shared PostgreSQL storage), compare, lr-find and the
TensorBoard files every run writes. Tiny trials (a few hundred images, 1-2 epochs) on the real MNIST files."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from conftest import REPO, as_from_a_terminal, cli_in_process, cores_to_spare, free_port, run_cli, spinning
from mnist_classifier.cli import main, print_trial
from mnist_classifier.config import TrainConfig
from mnist_classifier.errors import Interrupted, UserError
from mnist_classifier.experiments import SweepSpec, compare, lr_find, parse_space, sweep
from mnist_classifier.experiments import search
from mnist_classifier.experiments.search import load_spec, load_study
from mnist_classifier.experiments.space import grid
from mnist_classifier.experiments.trials import WORKER_ATTR
from mnist_classifier.training import fit
from mnist_classifier.training.optim import learning_rate

CPU = torch.device("cpu")
TINY = ["--train-subset", "400", "--val-size", "100", "--epochs", "1", "--device", "cpu", "--eval-batch-size", "2000"]


def tiny(data_dir: Path) -> list[str]:
    return [*TINY, "--data-dir", str(data_dir)]


def study_of(sweep_dir: Path) -> optuna.Study:
    return load_study(SweepSpec.from_dict(json.loads((sweep_dir / "sweep.json").read_text())), sweep_dir)


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_a_sweep_over_listed_values_runs_no_more_trials_than_their_points_by_default(data_dir, tmp_path):
    """`--param lr=0.001,0.01` with tpe took 20 trials by default: 18 repeated a point with the same seeds."""
    proc = run_cli("sweep", "--out", str(tmp_path / "s"), *tiny(data_dir), "--param", "lr=0.001,0.002", "--sampler",
                   "random", "--pruner", "none", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["trials"] == {"complete": 2, "pruned": 0, "failed": 0, "running": 0}
    assert len(study_of(tmp_path / "s").trials) == 2


def test_a_point_drawn_again_is_not_trained_again_and_the_report_says_which_trial_it_repeats(data_dir, tmp_path,
                                                                                              capsys):
    """tpe and random may draw a listed point twice; its runs, on the same seeds, would repeat the first ones. The
    second draw is queued here (Optuna's enqueue_trial) so that the test does not hang on the sampler's luck."""
    out = tmp_path / "s"
    base = TrainConfig(train_subset=400, val_size=100, epochs=1, device="cpu", data_dir=str(data_dir))
    spec = SweepSpec(params=parse_space(["lr=0.001,0.002"]), base=base, trials=2, sampler="random", pruner="none",
                     study="s")
    study = load_study(spec, out)
    for _ in range(2):
        study.enqueue_trial({"lr": 0.001})
    result = sweep(spec, out, on_trial=print_trial)
    first, second = sorted(study_of(out).trials, key=lambda t: t.number)
    assert second.state.name == "COMPLETE" and second.params == first.params and second.value == first.value
    assert second.user_attrs["repeat_of"] == 0 and "run_dirs" not in second.user_attrs
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0000-seed0"]  # trained once
    assert [t.note for t in result.trials if t.number == 1] == ["repeats trial 0, not trained again"]
    assert "(repeats trial 0, not trained again)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("extra, fragment", [
    (["--param", "colour=1,2"], "--param colour: unknown parameter"),
    (["--param", "lr=log:0..1"], "--lr must be > 0, got 0.0"),
    (["--param", "dropout=0..1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--param", "optimizer=adam,lbfgs"], "unknown --optimizer 'lbfgs'"),
    (["--param", "data_dir=a,b"], "--param data_dir: cannot be searched"),
    (["--param", "lr=0.001,0.01", "--param", "batch_size=32,64", "--sampler", "grid", "--trials", "3"],
     "the grid has 4 points, more than --trials 3"),
    (["--param", "lr=log:1e-4..1e-1", "--sampler", "grid"], "--sampler grid needs lists of values"),
    (["--param", "lr=0.001,0.01", "--trials", "3"], "--trials 3 is more than the 2 point(s) the listed values allow"),
    (["--param", "lr=0.001,0.01", "--sampler", "grid", "--trials", "3"], "--trials 3 is more than the 2 point(s)"),
    (["--param", "lr=0.001,0.01", "--param", "batch_size=32,64", "--sampler", "random", "--trials", "5"],
     "--trials 5 is more than the 4 point(s) the listed values allow; a trial past them repeats a point"),
    (["--param", "lr=0.001", "--trials", "2"], "one value is not a search"),
    (["--param", "lr=0.001,0.01", "--storage", "postgresql://u:secret@127.0.0.1:9/none"], "--storage: cannot open postgresql://u:***@"),
    (["--trials", "3"], "without --param a sweep has one point"),
    (["--param", "lr=0.001,0.01", "--val-size", "0"], "a sweep chooses on a validation split"),
    (["--param", "lr=0.001,0.01", "--jobs", "-1"], "--jobs must be 0 (one worker per free core) or more, got -1"),
    (["--param", "lr=log:1e-4..1e-2", "--trials", "1000", "--jobs", "1000"],  # 700 MB each, measured
     "--jobs 1000 needs about 781.2 GiB (800 MiB each), and "),
    (["--seed", "4294967295", "--seeds", "2"], "--seed 4294967295 with --seeds 2 would train seeds past the largest"),
])
def test_sweep_refuses_bad_input_with_one_line_and_writes_nothing(extra, fragment, data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--out", str(out), *tiny(data_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert "secret" not in err
    assert not out.exists()


def test_a_second_sweep_with_another_space_is_refused_and_the_first_kept(data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), *tiny(data_dir), "--param", "lr=0.001,0.002", "--sampler", "grid",
                 "--jobs", "1"]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main(["sweep", "--out", str(out), *tiny(data_dir), "--param", "batch_size=32,64", "--jobs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "holds another sweep (lr=0.001,0.002)" in err and len(err.strip().splitlines()) == 1
    code = main(["sweep", "--out", str(out), *tiny(data_dir), "--param", "lr=0.001,0.002", "--sampler", "grid"])
    assert code == 2 and "continue it with --resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: t for p, t in before.items() if p.name != ".lock"}


# ---------------------------------------------------------------------------------------------------------------
# The objective, pruning, the report


@pytest.mark.slow
def test_the_objective_is_validation_accuracy_and_the_printed_command_reproduces_the_best(data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), *tiny(data_dir), "--param", "lr=0.001,0.003", "--sampler", "grid",
                 "--seeds", "2", "--jobs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trials"] == {"complete": 2, "pruned": 0, "failed": 0, "running": 0}
    study = study_of(out)
    for trial in study.trials:
        summaries = [json.loads((out / d / "summary.json").read_text()) for d in trial.user_attrs["run_dirs"]]
        assert [s["seed"] for s in summaries] == [0, 1]
        assert trial.value == pytest.approx(sum(s["val_accuracy"] for s in summaries) / 2)
        assert trial.user_attrs["test_accuracies"] == [s["test_accuracy"] for s in summaries]
    best = max(study.trials, key=lambda t: t.value)
    assert result["best"]["trial"] == best.number and result["best"]["val_accuracy"] == best.value
    # the printed command trains the best point's first seed again, to the same numbers
    command = shlex.split(result["best"]["command"])
    assert command[:2] == ["mnist", "train"]
    assert main([*command[1:], "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    first = json.loads((out / best.user_attrs["run_dirs"][0] / "summary.json").read_text())
    assert (again["val_accuracy"], again["test_accuracy"]) == (first["val_accuracy"], first["test_accuracy"])


@pytest.mark.parametrize("search", [["--sampler", "grid"], ["--trials", "3", "--param", "lr=log:1e-4..1e-2"]])
def test_a_sweep_whose_every_trial_fails_stops_after_its_trials_and_exits_1(search, data_dir, tmp_path):
    # Every point is refused when its run starts (--pretrained is for efficientnet-lite0 alone): the sweep ends
    # after its trials, each failed with the reason, instead of asking Optuna for trial after trial
    out = tmp_path / "sweep"
    done = run_cli("sweep", "--out", str(out), *tiny(data_dir), "--model", "efficientnet-lite0", "--pretrained",
                   "--param", "model=guide-cnn,bn-cnn", "--jobs", "2", *search, timeout=120)
    trials = 2 if "grid" in search else 3
    assert done.returncode == 1, done.stderr
    assert f"Trials: {trials} failed." in done.stdout and "No trial completed" in done.stdout
    assert done.stdout.count("are for efficientnet-lite0, not ") == trials
    study = study_of(out)
    assert [t.state.name for t in study.trials] == ["FAIL"] * trials
    resumed = run_cli("sweep", "--out", str(out), "--resume", *tiny(data_dir), "--model", "efficientnet-lite0",
                      "--pretrained", "--param", "model=guide-cnn,bn-cnn", "--jobs", "2", *search, timeout=120)
    assert resumed.returncode == 1 and len(study_of(out).trials) == trials  # nothing left to run
    with pytest.raises(UserError, match=f"no runs; {trials} trial folders hold only the record"):
        compare([out])


def test_a_trial_with_an_absurd_learning_rate_is_pruned(data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    # The grid runs shuffled by --seed; take a seed whose order has the two sensible rates complete first (the
    # median pruner's start-up trials), then Adam at lr 0.5 (12 % after epoch 1).
    space = parse_space(["lr=0.001,0.002,0.5"])
    seed = next(s for s in range(100) if grid(space, shuffle_seed=s)[-1] == {"lr": 0.5})
    assert main(["sweep", "--out", str(out), *tiny(data_dir), "--epochs", "2", "--param", "lr=0.001,0.002,0.5",
                 "--seed", str(seed), "--sampler", "grid", "--pruner", "median", "--jobs", "1"]) == 0
    report = capsys.readouterr().out
    study = study_of(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = study.trials[2]
    assert pruned.params == {"lr": 0.5} and list(pruned.intermediate_values) == [1]
    assert pruned.user_attrs["pruned_at"].startswith("epoch 1: validation accuracy")
    assert json.loads((out / "trial-0002-seed0" / "trial.json").read_text())["state"] == "pruned"
    assert not (out / "trial-0002-seed0" / "summary.json").exists()
    assert "    2  pruned" in report and "1 pruned" in report
    assert [t.params["lr"] for t in study.trials] == [p["lr"] for p in grid(space, shuffle_seed=seed)]
    table = compare([out])
    assert {g.flags["lr"]: g.row()["state"] for g in table.groups} == {0.001: "complete", 0.002: "complete", 0.5: "pruned"}
    # TensorBoard's HPARAMS tab shows the pruned point too, as a failure, beside its last validation accuracy
    rows = {row["name"]: row for row in hparams_rows(out, count=3)}
    assert {name: row["sessions"][0]["status"] for name, row in rows.items()} == {
        "trial-0000-seed0": "STATUS_SUCCESS", "trial-0001-seed0": "STATUS_SUCCESS",
        "trial-0002-seed0": "STATUS_FAILURE"}
    [epoch_1] = csv.DictReader((out / "trial-0002-seed0" / "metrics.csv").open())
    [shown] = rows["trial-0002-seed0"]["metricValues"]
    assert shown["name"]["tag"] == "hparam/val_accuracy"
    assert shown["value"] == pytest.approx(float(epoch_1["val_accuracy"]))
    assert rows["trial-0002-seed0"]["hparams"]["lr"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_resumes_to_exactly_n_trials_none_repeated(data_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), *TINY, "--data-dir", str(data_dir), "--epochs", "3", "--param",
            "lr=log:1e-4..1e-2", "--sampler", "random", "--pruner", "none", "--trials", "4", "--jobs", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # kill it inside trial 2: its first epoch written, its summary not
    deadline = time.monotonic() + 240
    while not (out / "trial-0002-seed0" / "metrics.csv").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "trial-0002-seed0" / "summary.json").exists()
    finished = {d: (d / "summary.json").stat().st_mtime_ns for d in out.glob("trial-*") if (d / "summary.json").exists()}
    assert len(finished) == 2
    killed_params = next(t.params for t in study_of(out).trials if t.number == 2)

    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["trials"] == {"complete": 4, "pruned": 0, "failed": 1, "running": 0}
    study = study_of(out)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert len({t.params["lr"] for t in complete}) == 4  # no point trained twice
    retry = next(t for t in complete if t.user_attrs.get("retry_of") == 2)
    assert retry.params == killed_params  # the killed point ran again, as a new trial
    for d, mtime in finished.items():  # the trials finished before the kill were not touched
        assert (d / "summary.json").stat().st_mtime_ns == mtime
    # resuming a finished sweep runs nothing more
    again = run_cli(*args, "--resume", "--json")
    assert json.loads(again.stdout)["trials"]["complete"] == 4


def _group_members(pgid: int) -> dict[int, str]:
    """pid -> command line of the live processes (zombies aside) of process group ``pgid``: the sweep's spawned
    workers, and multiprocessing's resource tracker, stay in its group."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found[int(stat.parent.name)] = cmdline
    return found


def _sweep_at_epoch_2(out: Path, data_dir: Path, jobs: str, preexec) -> tuple[list[str], subprocess.Popen]:  # noqa: ANN001
    """`mnist sweep` of 4 grid points of 20 epochs of 400 images (so a signal lands inside it) in its own process
    group, started through ``preexec``; returns its arguments and process once a trial has finished epoch 2."""
    args = ["sweep", "--out", str(out), *TINY, "--data-dir", str(data_dir), "--epochs", "20", "--param",
            "lr=0.001,0.002,0.003,0.004", "--sampler", "grid", "--pruner", "none", "--jobs", jobs]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec)
    deadline = time.monotonic() + 240
    while not any(len(m.read_text().splitlines()) > 2 for m in out.glob("trial-*/metrics.csv")):  # epoch 2 done
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before the signal"
    return args, proc


@pytest.mark.slow
@pytest.mark.serial  # a signal timed against the sweep's trials: twice in make test's parallel phase it came late
@pytest.mark.parametrize("jobs, signum, to_group", [
    ("1", signal.SIGINT, True), ("2", signal.SIGINT, True),  # a terminal's Ctrl-C reaches the whole process group
    ("1", signal.SIGTERM, False), ("2", signal.SIGTERM, False),  # a scheduler's SIGTERM, to the command alone
    ("2", signal.SIGHUP, True),  # a closed terminal's, to the whole job twice: from its shell, then the kernel
])
def test_a_stop_signal_stops_the_whole_sweep_and_resume_runs_the_stopped_point_again(data_dir, tmp_path, jobs,
                                                                                     signum, to_group):
    """Before 2026-12-05 a Ctrl-C stopped only the running trial (recorded as failed, with advice to resume it as
    a plain run) and the sweep went on to the next; a SIGTERM to a sweep with workers left them running. Before
    2026-12-06 a closed terminal's SIGHUP killed the sweep and its workers at once, losing the epochs in flight.
    Now the sweep ends with status 128 + the signal and says how to continue; the stopped point runs again on
    --resume."""
    out = tmp_path / "sweep"
    args, proc = _sweep_at_epoch_2(out, data_dir, jobs, as_from_a_terminal)
    if to_group:
        os.killpg(proc.pid, signum)
        if signum == signal.SIGHUP:
            time.sleep(0.05)
            os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    workers = [c for c in _group_members(proc.pid).values() if "spawn_main" in c]
    assert workers == [], f"a worker outlived the sweep: {workers}"
    deadline = time.monotonic() + 30  # the resource tracker leaves on its own once the sweep has gone
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(proc.pid) == {}
    assert err.strip().splitlines()[-1].endswith(f"continue with: mnist sweep --resume --out {out}")
    complete_before = [t for t in study_of(out).trials if t.state.name == "COMPLETE"]
    assert len(complete_before) < 4  # it stopped: no trial was started after the Ctrl-C
    # each worker stopped its trial itself and queued its point again; one killed leaves it RUNNING
    assert [t.number for t in study_of(out).trials if t.state.name == "RUNNING"] == []

    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    complete = [t for t in study_of(out).trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["lr"] for t in complete) == [0.001, 0.002, 0.003, 0.004]  # each point once, all of them


@pytest.mark.slow
@pytest.mark.serial
def test_a_sweep_started_ignoring_ctrl_c_ignores_it_whole_and_runs_every_point(data_dir, tmp_path):
    """A shell starts a background job (`mnist sweep ... &`) with SIGINT ignored, and Python keeps it ignored.
    Before 2026-12-05 a sweep worker inside a trial heeded a Ctrl-C to the group all the same: its trial stopped
    and was queued again, while the sweep and its other worker went on, and the sweep exited 0 with that point
    never run (what `make test` run in the background showed, 4 suites in a row). Now nothing in it heeds it."""
    out = tmp_path / "sweep"
    _, proc = _sweep_at_epoch_2(out, data_dir, "2", lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    states = sorted(t.state.name for t in study_of(out).trials)
    assert states == ["COMPLETE"] * 4 and sorted(t.params["lr"] for t in study_of(out).trials) == [
        0.001, 0.002, 0.003, 0.004]


@pytest.mark.slow
@pytest.mark.serial
def test_a_worker_stopped_alone_fails_the_sweep_and_resume_runs_its_point(data_dir, tmp_path):
    """SIGTERM to one worker of `mnist sweep --jobs 2` (`kill PID`, the OOM reaper's warning): it saved its place
    and queued its point again, then exited 0, so once the other worker had finished, the sweep exited 0 with the
    point never run. Now the worker exits 143, the sweep says so and how to continue, and --resume runs it."""
    out = tmp_path / "sweep"
    args, proc = _sweep_at_epoch_2(out, data_dir, "2", None)
    busy = next(m.parent.name for m in out.glob("trial-*/metrics.csv") if len(m.read_text().splitlines()) > 2)
    trial = next(t for t in study_of(out).trials if t.number == int(busy.split("-")[1]))  # trial-NNNN-seed0
    worker = int(trial.user_attrs[WORKER_ATTR].rsplit(":", 1)[1])  # host:pid of the worker inside that trial
    os.kill(worker, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("mnist sweep: error: 1 of 2 sweep workers failed (exit 143); continue "
                                            "with --resume"), err
    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    complete = [t for t in study_of(out).trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["lr"] for t in complete) == [0.001, 0.002, 0.003, 0.004]  # each point once, all of them


@pytest.mark.slow
def test_a_sweep_killed_outright_stops_its_workers_and_resume_runs_every_point_once(data_dir, tmp_path):
    """SIGKILL to `mnist sweep --jobs 2` alone (the OOM killer, `kill -9`): its two workers went on through the
    remaining trials, unwatched. Now each notices its parent is gone and stops as on SIGTERM (a trial inside its
    epochs saves its place and is queued again), and --resume runs each point once."""
    out = tmp_path / "sweep"
    # 30 epochs of 400 images: trials of a few seconds, so both workers are inside one when the parent dies
    args = ["sweep", "--out", str(out), *TINY, "--data-dir", str(data_dir), "--epochs", "30", "--param",
            "lr=0.001,0.002,0.003,0.004", "--sampler", "grid", "--pruner", "none", "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("trial-*/metrics.csv")):  # inside a trial: its first epoch written
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    workers = lambda: [pid for pid, c in _group_members(proc.pid).items() if "spawn_main" in c]  # noqa: E731
    try:
        deadline = time.monotonic() + 60  # noticed within 0.5 s, then the step in flight and the save
        while workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers() == [], "a sweep worker outlived its parent by 60 s"
    finally:
        for pid in workers():
            os.kill(pid, signal.SIGKILL)
    # they stopped: before, the orphaned workers trained on through every remaining point
    assert len([t for t in study_of(out).trials if t.state.name == "COMPLETE"]) < 4

    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    complete = [t for t in study_of(out).trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["lr"] for t in complete) == [0.001, 0.002, 0.003, 0.004]  # each point once, all of them


# ---------------------------------------------------------------------------------------------------------------
# Two workers, one PostgreSQL


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster: ``url`` of its ``sweeps`` database; ``stop`` and ``start`` it again."""

    url: str
    pg_ctl: list[str]  # the pg_ctl command line up to its action, run as the postgres user

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-m", "immediate", "stop"], check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run([*self.pg_ctl, "-w", "start"], check=True, capture_output=True)


@contextlib.contextmanager
def _postgres_cluster(password: str = ""):
    """A real PostgreSQL server from Debian's package, on a free port, in a throw-away cluster; with
    ``password``, its postgres user must give it (scram-sha-256), else any local connection is trusted."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.skip("needs Debian's postgresql package (`make system-deps` installs it)")
    bindir = bins[-1].parent
    # not under pytest's tmp_path: the postgres user must be able to enter the folder
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    auth = ["-A", "trust"]
    if password:
        (root / "pw").write_text(password + "\n")
        auth = ["-A", "scram-sha-256", f"--pwfile={root / 'pw'}"]
    if as_user:
        for path in (root, *root.iterdir()):
            shutil.chown(path, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(root / "data"), *auth, "-U", "postgres"],
                   check=True, capture_output=True)
    creds = f"postgres:{password}" if password else "postgres"
    server = Postgres(f"postgresql://{creds}@127.0.0.1:{port}/sweeps",
                      [*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"),
                       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1"])
    server.start()
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "sweeps"], check=True, capture_output=True, env={**os.environ, "PGPASSWORD": password})
        yield server
    finally:
        subprocess.run([*server.pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_server():
    with _postgres_cluster() as server:
        yield server


@pytest.fixture
def postgres(postgres_server):
    return postgres_server.url


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_database_that_stops_answering_ends_the_sweep_in_one_line_and_resume_finishes_it(postgres_server, data_dir,
                                                                                          tmp_path, jobs):
    """PostgreSQL stopped mid-trial (a restart, a failover): the sweep died with SQLAlchemy's traceback, which Optuna
    words as "invalid data in the commit". Now one line says the storage stopped answering and how to continue;
    once it answers again, --resume runs every point once."""
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), *TINY, "--data-dir", str(data_dir), "--epochs", "30", "--param",
            "lr=0.001,0.002,0.003,0.004", "--sampler", "grid", "--pruner", "none", "--jobs", jobs,
            "--storage", postgres_server.url, "--study", "stopped"]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("trial-*/metrics.csv")):  # inside a trial: its first epoch reported
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    postgres_server.stop()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err
    said = [line for line in err.strip().splitlines() if "error:" in line]
    worker = "" if jobs == "1" else r"worker \d: "  # each worker says it in one line, then the sweep
    assert all(re.fullmatch(rf"mnist sweep: {worker}error: the sweep's storage stopped answering \(.+\); the trials "
                            rf"that were running will run again; continue with: mnist sweep --resume --out "
                            rf"{re.escape(str(out))} once it answers", line) for line in said[:int(jobs)]), said
    if jobs == "2":
        assert said[-1] == "mnist sweep: error: 2 of 2 sweep workers failed (exit 2); continue with --resume", said

    postgres_server.start()
    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="stopped", storage=postgres_server.url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["lr"] for t in complete) == [0.001, 0.002, 0.003, 0.004]  # each point once, all of them


def test_two_workers_share_one_postgresql_storage_and_reach_exactly_n_trials(postgres, data_dir, tmp_path):
    args = [*TINY, "--data-dir", str(data_dir), "--param", "lr=log:1e-4..1e-2", "--sampler", "random",
            "--pruner", "none", "--trials", "6", "--jobs", "1", "--storage", postgres, "--study", "shared"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "mnist_classifier", "sweep", "--out", str(tmp_path / name), *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("machine-a", "machine-b")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=postgres)
    # Asking at once for the last trial, each machine gets one (their locks are per folder): the one numbered
    # past the count is told FAIL and marked surplus (search._take_trial), never run, and left out of reports.
    surplus = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("surplus")]
    assert all(t.state.name == "FAIL" and t.number >= 6 for t in surplus), surplus
    assert states(study) == {"COMPLETE": 6, **({"FAIL": len(surplus)} if surplus else {})}
    ran = {name: {int(d.name.split("-")[1]) for d in (tmp_path / name).glob("trial-*")} for name in ("machine-a", "machine-b")}
    assert ran["machine-a"] and ran["machine-b"], ran  # both worked
    assert ran["machine-a"].isdisjoint(ran["machine-b"])
    assert ran["machine-a"] | ran["machine-b"] == set(range(6))


def test_a_storage_password_is_written_nowhere_and_resume_asks_for_it_again(data_dir, tmp_path):
    """sweep.json (mode 644, in a folder often copied) and the study kept the --storage URL whole, password and
    all. Now both keep it as postgresql://postgres:***@...; the workers get the whole URL through spawn's pipe,
    and the server asks for the password (scram-sha-256), so a worker given the written URL could not connect."""
    secret = "s3cret-Pw"
    with _postgres_cluster(password=secret) as server:
        out = tmp_path / "sweep"
        base = ["sweep", "--out", str(out), *tiny(data_dir), "--param", "lr=0.001,0.002", "--param",
                "batch_size=32,64", "--sampler", "grid", "--pruner", "none"]
        proc = run_cli(*base, "--jobs", "2", "--storage", server.url, "--json", env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["trials"]["complete"] == 4
        written = [f for f in out.rglob("*") if f.is_file()]
        assert out / "sweep.json" in written and not [f for f in written if secret.encode() in f.read_bytes()]
        assert secret not in proc.stdout + proc.stderr
        study = optuna.load_study(study_name="sweep", storage=server.url)
        assert secret not in json.dumps(study.user_attrs) and ":***@127.0.0.1" in json.dumps(study.user_attrs)

        # resumed from sweep.json alone, the password comes from where libpq looks, or the one line says so
        resumed = run_cli("sweep", "--out", str(out), "--resume")
        assert resumed.returncode == 2 and len(resumed.stderr.strip().splitlines()) == 1
        assert resumed.stderr.strip().endswith("; sweep.json keeps no password: pass --storage with the whole URL, "
                                               "or keep the password in PGPASSWORD or ~/.pgpass"), resumed.stderr
        resumed = run_cli("sweep", "--out", str(out), "--resume", "--json", env={"PGPASSWORD": secret})
        assert resumed.returncode == 0 and json.loads(resumed.stdout)["trials"]["complete"] == 4, resumed.stderr
        other = server.url.replace("/sweeps", "/others")
        refused = run_cli("sweep", "--out", str(out), "--resume", "--storage", other)
        assert refused.returncode == 2 and "is not this sweep's storage" in refused.stderr
        assert secret not in refused.stderr
        resumed = run_cli("sweep", "--out", str(out), "--resume", "--storage", server.url, "--json")
        assert resumed.returncode == 0 and json.loads(resumed.stdout)["trials"]["complete"] == 4, resumed.stderr

        # compare draws the importance from the study, which the password in PGPASSWORD reaches; without it, the
        # table and curves are still written and one line says what was left out
        compared = run_cli("compare", str(out), "--out", str(tmp_path / "cmp"), "--json", env={"PGPASSWORD": secret})
        assert compared.returncode == 0 and compared.stderr == "", compared.stderr
        assert set(json.loads(compared.stdout)["importance"]) == {"lr", "batch_size"}
        compared = run_cli("compare", str(out), "--out", str(tmp_path / "cmp"), "--json")
        assert compared.returncode == 0 and json.loads(compared.stdout)["importance"] == {}
        assert compared.stderr.startswith("mnist compare: warning: importance.png left out: --storage: cannot open "
                                          "postgresql://postgres:***@127.0.0.1") and secret not in compared.stderr
        assert (tmp_path / "cmp" / "compare.md").is_file()

        # a sweep.json written before kept the whole URL: it resumes as it did, and is written without it
        spec = json.loads((out / "sweep.json").read_text())
        (out / "sweep.json").write_text(json.dumps({**spec, "storage": server.url}))
        resumed = run_cli("sweep", "--out", str(out), "--resume", "--json")
        assert resumed.returncode == 0 and json.loads(resumed.stdout)["trials"]["complete"] == 4, resumed.stderr
        assert secret not in (out / "sweep.json").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Workers


@pytest.mark.slow
def test_jobs_2_runs_two_worker_processes_that_share_the_trials(data_dir, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli("sweep", "--out", str(out), *tiny(data_dir), "--param", "lr=0.001,0.002,0.003,0.004",
                   "--sampler", "grid", "--pruner", "none", "--jobs", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["trials"]["complete"] == 4
    workers = {t.user_attrs["worker"] for t in study_of(out).trials}
    assert len(workers) == 2  # two processes took trials
    assert sorted(t.params["lr"] for t in study_of(out).trials) == [0.001, 0.002, 0.003, 0.004]


@pytest.mark.slow
def test_more_jobs_than_cores_still_finish_the_sweep_after_one_warning(data_dir, tmp_path):
    from mnist_classifier.device import usable_cores

    jobs = usable_cores() + 1
    out = tmp_path / "sweep"
    grid_points = ",".join(str(0.001 * (k + 1)) for k in range(jobs))
    proc = run_cli("sweep", "--out", str(out), *tiny(data_dir), "--param", f"lr={grid_points}", "--sampler", "grid",
                   "--pruner", "none", "--jobs", str(jobs), "--json")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"--jobs {jobs} is more than the {jobs - 1} cores" in warnings[0]
    assert json.loads(proc.stdout)["trials"]["complete"] == jobs


@pytest.mark.serial
@pytest.mark.slow  # it needs a quiet machine, and two epochs of all the images
def test_a_trial_gives_up_a_core_to_a_neighbour_that_starts_while_it_trains(data_dir, tmp_path):
    """The same thread policy as `mnist train`: a sweep's worker follows the load while its trial trains."""
    cores = cores_to_spare()
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "sweep", "--out", str(out), "--data-dir",
                             str(data_dir), "--device", "cpu", "--val-size", "5000", "--epochs", "2", "--jobs", "1",
                             "--no-tensorboard", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    run = out / "trial-0000-seed0"
    deadline = time.monotonic() + 300
    while not (run / "config.json").exists():  # written as the trial's training starts
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    with spinning(cores - 1):
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["threads"] == 1 and summary["threads_followed"][-1][1] == 1, summary.get("threads_followed")


def test_a_sweep_without_params_repeats_one_config_over_seeds(data_dir, tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path / "s"), *tiny(data_dir), "--seeds", "2", "--jobs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trials"]["complete"] == 1 and result["best"]["params"] == {}
    assert sorted(p.name for p in (tmp_path / "s").glob("trial-*")) == ["trial-0000-seed0", "trial-0000-seed1"]
    # compare's curves of these one-epoch runs tick the whole epoch 1 alone, not 0.96, 0.98, 1.00, ...
    from mnist_classifier.experiments.plots import curves_figure

    for ax in curves_figure(compare([tmp_path / "s"])).axes:
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == [1]



def test_a_worker_loads_the_data_once_for_all_its_trials(data_dir, tmp_path, monkeypatch):
    loads = []
    real = search.load_configured
    monkeypatch.setattr(search, "load_configured", lambda cfg: loads.append(cfg) or real(cfg))
    base = TrainConfig(train_subset=400, val_size=100, epochs=1, device="cpu", data_dir=str(data_dir))
    spec = SweepSpec(params=parse_space(["lr=0.001,0.002,0.003"]), base=base, trials=3, sampler="grid", pruner="none")
    result = sweep(spec, tmp_path / "sweep", jobs=1)
    assert result.counts()["complete"] == 3 and len(loads) == 1



@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_between_two_trials_ends_the_sweep_before_it_takes_another(data_dir, tmp_path, signum):
    """A signal that came between two trials' training (here, as the first trial is reported) found no stop flag
    in place: Ctrl-C raised KeyboardInterrupt past the worker, and SIGTERM or SIGHUP killed it outright, leaving
    the point it had just taken RUNNING ("exit -15"). Now a worker holds one flag from its first trial to its
    last: it takes no further trial and ends with 128 + the signal, saying how to continue."""
    base = TrainConfig(train_subset=400, val_size=100, epochs=1, device="cpu", data_dir=str(data_dir))
    spec = SweepSpec(params=parse_space(["lr=0.001,0.002,0.003"]), base=base, trials=3, sampler="grid", pruner="none")
    before = {sig: signal.signal(sig, handler) for sig, handler in  # as a terminal starts it, even under nohup
              [(signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL)]}
    try:
        with pytest.raises(Interrupted, match="between trials; continue with") as stopped:
            sweep(spec, tmp_path / "sweep", jobs=1, on_trial=lambda row: os.kill(os.getpid(), signum))
        after = signal.getsignal(signum)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert stopped.value.status == 128 + signum
    # the grid's other two points wait in the queue, none taken
    assert [t.state.name for t in study_of(tmp_path / "sweep").trials] == ["COMPLETE", "WAITING", "WAITING"]
    assert after == (signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)  # given back


def test_a_trial_asked_for_past_the_count_is_dropped_as_surplus_and_left_out_of_the_result(tmp_path):
    """Two machines (two folders, so two locks) asking at once for the last trial: the other machine's ask lands
    between this one's count and its own. Its trial runs; this one's, numbered past --trials, is told FAIL and
    marked surplus without running, and the sweep's result does not count it as a failure."""
    from mnist_classifier.experiments.report import summarize

    base = TrainConfig(val_size=100, device="cpu")
    spec = SweepSpec(params=parse_space(["lr=log:1e-4..1e-2"]), base=base, trials=1, sampler="random",
                     pruner="none", study="race", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    here = tmp_path / "here"
    here.mkdir()
    study = search.load_study(spec, here)
    real_ask = study.ask
    study.ask = lambda: (real_ask(), real_ask())[1]  # the other machine's trial 0 first, then ours
    assert search._take_trial(study, spec, here) is None
    got = [(t.number, t.state.name, bool(t.user_attrs.get("surplus"))) for t in study.get_trials(deepcopy=False)]
    assert got == [(0, "RUNNING", False), (1, "FAIL", True)]
    study.tell(0, 98.0)  # the other machine's trial completes
    assert summarize(study, spec, here).counts() == {"complete": 1, "pruned": 0, "failed": 0, "running": 0}


# ---------------------------------------------------------------------------------------------------------------
# compare


def test_compare_lists_exactly_the_flags_that_differ_with_mean_and_sd_over_seeds(data_dir, splits, tmp_path, capsys):
    base = TrainConfig(train_subset=400, val_size=100, epochs=2, device="cpu", data_dir=str(data_dir))
    runs = []
    for name, changes in (("a0", {}), ("a1", {"seed": 1}), ("b0", {"lr": 0.003})):
        run_dir = tmp_path / name
        summary = fit(TrainConfig(**{**base.to_dict(), **changes, "out": str(run_dir)}), splits, CPU, run_dir)
        runs.append(summary)
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "a0"), str(tmp_path / "a1"), str(tmp_path / "b0"), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["flags"] == ["lr"]
    groups = {g["lr"]: g for g in result["groups"]}
    assert groups[0.001]["runs"] == 2 and groups[0.003]["runs"] == 1
    vals = [runs[0]["val_accuracy"], runs[1]["val_accuracy"]]
    assert groups[0.001]["val_accuracy"] == pytest.approx(sum(vals) / 2, abs=1e-4)
    assert groups[0.001]["val_accuracy_sd"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5, abs=1e-4)
    assert groups[0.003]["test_accuracy"] == pytest.approx(runs[2]["test_accuracy"], abs=1e-4)
    assert groups[0.003]["test_accuracy_sd"] is None  # one run measures no spread: not a 0
    for name in ("compare.csv", "compare.md", "curves.png", "params.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, _, *rows = (out / "compare.md").read_text().splitlines()
    assert header.startswith("| lr | runs | state | val_accuracy |")
    cells = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in rows}
    assert cells["0.001"][3] == f"{groups[0.001]['val_accuracy']:.2f} ± {groups[0.001]['val_accuracy_sd']:.2f}"
    assert cells["0.003"][4] == f"{runs[2]['test_accuracy']:.2f}"  # the one run's accuracy, with no ± 0.00
    # a run named again, under another spelling, counts once: not as a second seed with a spread of 0
    again = compare([tmp_path / "a0", tmp_path / "b0", f"{tmp_path}/b0/", tmp_path / "cmp" / ".." / "b0"])
    assert {g.flags["lr"]: len(g.runs) for g in again.groups} == {0.001: 1, 0.003: 1}
    assert again.groups[0].row()["test_accuracy_sd"] is None


def test_an_out_folder_holding_another_commands_work_is_refused_and_left_as_it_was(data_dir, trained_checkpoint,
                                                                                    tmp_path):
    """`mnist compare RUN --out RUN` replaced the run's own curves.png with the comparison's; `sweep --out RUN`
    and `train --out SWEEP` mixed one folder's files with the other's; `train --resume TRIAL --epochs 2` trained
    a sweep's trial on, while the sweep kept reporting its one-epoch result."""
    run, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    shutil.copytree(trained_checkpoint.parent, run)
    (run / "curves.png").write_bytes(b"the run's own curves")
    made = run_cli("sweep", "--out", str(sweep_dir), *tiny(data_dir), "--param", "lr=0.001,0.002", "--sampler", "grid")
    assert made.returncode == 0, made.stderr
    before = {p: p.read_bytes() for folder in (run, sweep_dir) for p in folder.rglob("*") if p.is_file()}
    cases = [
        (("compare", str(run), "--out", str(run)),
         f"{run} holds a run (config.json); a comparison goes into a folder of its own: choose another --out"),
        (("compare", str(sweep_dir), "--out", str(sweep_dir)),
         f"{sweep_dir} holds a sweep (sweep.json); a comparison goes into a folder of its own: choose another --out"),
        (("sweep", "--out", str(run), *tiny(data_dir), "--param", "lr=0.001,0.002"),
         f"{run} holds a run (config.json); choose another --out for the sweep"),
        (("train", "--out", str(sweep_dir), *TINY, "--data-dir", str(data_dir)),
         f"{sweep_dir} holds a sweep (sweep.json); choose another --out"),
        (("train", "--resume", str(sweep_dir / "trial-0000-seed0"), "--epochs", "2", "--data-dir", str(data_dir)),
         f"--resume {sweep_dir / 'trial-0000-seed0'}: the folder is a trial of the sweep in {sweep_dir}, whose record "
         f"of it would no longer match; continue the sweep with `mnist sweep --resume --out {sweep_dir}`, or train "
         f"these settings into a new --out"),
    ]
    for args, message in cases:
        proc = cli_in_process(*args)
        assert proc.returncode == 2 and proc.stderr.strip() == f"mnist {args[0]}: error: {message}", proc.stderr
    after = {p: p.read_bytes() for folder in (run, sweep_dir) for p in folder.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_compare_of_a_sweep_draws_parameter_importance(data_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), *tiny(data_dir), "--param", "lr=log:1e-4..1e-2", "--param",
                 "batch_size=32,64", "--trials", "5", "--sampler", "random", "--pruner", "none", "--jobs", "1"]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["importance"]) == {"lr", "batch_size"}  # two parameters: one alone explains all by definition
    assert sum(result["importance"].values()) == pytest.approx(1.0, abs=0.01)
    assert (tmp_path / "cmp" / "importance.png").stat().st_size > 0
    # params.png: the searched lr range on a log axis with matplotlib's decade ticks, not one label per trial
    # (five values that may fall close together and overprint each other)
    from mnist_classifier.experiments.plots import params_figure

    axes = {ax.get_xlabel(): ax for ax in params_figure(compare([out]), load_spec(out).params).axes}
    low, high = axes["lr"].get_xlim()
    shown = [t for t in axes["lr"].get_xticks() if low <= t <= high]
    trial_lrs = {t.params["lr"] for t in study_of(out).trials}
    assert axes["lr"].get_xscale() == "log" and not trial_lrs & set(shown)
    assert all(math.log10(t) == round(math.log10(t)) for t in shown), shown


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# lr-find


@pytest.mark.slow
def test_lr_find_suggests_a_sensible_rate_for_the_guide_cnn_and_writes_only_its_plot(data_dir, tmp_path):
    before = set(tmp_path.iterdir())
    proc = run_cli("lr-find", "--data-dir", str(data_dir), "--device", "cpu", "--plot", str(tmp_path / "lr.png"),
                   "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert 1e-4 <= result["suggested_lr"] <= 1e-1 and result["rule"] == "steepest"
    assert result["min_loss_lr"] > result["suggested_lr"]
    assert set(tmp_path.iterdir()) - before == {tmp_path / "lr.png"}  # no checkpoint, no run folder


def test_lr_find_stops_once_the_loss_diverges(data_dir, splits):
    cfg = TrainConfig(optimizer="sgd", train_subset=2000, device="cpu", data_dir=str(data_dir))
    result = lr_find(cfg, splits, CPU, start=1e-4, end=1e4, steps=200)
    assert result.stopped_at is not None and len(result.lrs) < 200
    assert result.suggestion < result.stopped_at


def test_lr_find_says_when_its_range_misses_the_descent_and_names_the_rule_it_fell_back_on(data_dir, splits,
                                                                                            tmp_path):
    """A range that starts above the useful rates diverged at once, and the loss's minimum at the first rate gave
    "suggested 1.0 (rule: steepest)", below the range and from a rule that had not been applied, without a word."""
    cfg = TrainConfig(train_subset=2000, device="cpu", data_dir=str(data_dir))
    too_high = lr_find(cfg, splits, CPU, start=10.0, end=1000.0, steps=20)
    assert too_high.stopped_at is not None and too_high.rule == "minimum/10"
    assert too_high.suggestion == pytest.approx(too_high.lrs[0] / 10) and "start lower (--start)" in too_high.warning
    too_low = lr_find(cfg, splits, CPU, start=1e-5, end=1e-3, steps=40)
    assert too_low.stopped_at is None and too_low.rule == "steepest" and int(np.argmin(too_low.smoothed)) == 39
    assert "end higher (--end)" in too_low.warning
    assert lr_find(cfg, splits, CPU, start=1e-5, end=1.0, steps=100).warning is None  # brackets the descent

    proc = run_cli("lr-find", "--data-dir", str(data_dir), "--device", "cpu", "--train-subset", "2000", "--start",
                   "10", "--end", "1000", "--steps", "20", "--plot", str(tmp_path / "lr.png"), "--json")
    assert proc.returncode == 0 and proc.stderr.startswith("mnist lr-find: warning: the smoothed loss was lowest at")
    result = json.loads(proc.stdout)
    assert result["rule"] == "minimum/10" and result["warning"] in proc.stderr and (tmp_path / "lr.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard


def test_every_run_writes_tensorboard_events_that_tensorboard_reads(data_dir, splits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cfg = TrainConfig(train_subset=1000, epochs=2, log_every=5, schedule="onecycle", warmup=0.25, device="cpu",
                      data_dir=str(data_dir), out=str(run_dir))
    summary = fit(cfg, splits, CPU, run_dir)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    rows = json.loads(json.dumps(torch.load(run_dir / "last.pt", weights_only=True)["metrics"]))
    acc = [(e.step, round(e.value, 2)) for e in events.Scalars("test/accuracy")]
    assert acc == [(r["epoch"], round(r["test_accuracy"], 2)) for r in rows]
    assert [e.step for e in events.Scalars("train/epoch_loss")] == [1, 2]
    assert len(events.Scalars("train/loss")) >= 2 * (16 // 5)  # 16 batches an epoch, one value every 5
    # the schedule within the run, at the loss's steps: the rate each of those steps took (warm-up, then decay)
    lrs = events.Scalars("train/lr")
    assert [e.step for e in lrs] == [e.step for e in events.Scalars("train/loss")]
    expected = [learning_rate(e.step - 1, 32, 0.001, "onecycle", 0.25) for e in lrs]  # steps count from 1
    assert [e.value for e in lrs] == pytest.approx(expected)
    assert max(e.value for e in lrs) > 2 * lrs[0].value and lrs[-1].value < max(e.value for e in lrs) / 2
    assert events.Scalars("hparam/test_accuracy")[0].value == pytest.approx(summary["test_accuracy"], abs=1e-3)
    assert "test/confusion_matrix" in tags["images"]
    image = events.Images("test/confusion_matrix")[0]
    assert (image.width, image.height) == (240, 240)  # 10 classes x 24 px


def hparams_rows(logdir: Path, count: int = 1) -> list[dict]:
    """The HPARAMS tab's rows (session groups), as a real TensorBoard on loopback serves them to its page, once it
    shows ``count`` of them."""
    import httpx

    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                              "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    query = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 100}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the board answers before it has read every run: until all show
            try:
                rows = httpx.post(f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups", json=query,
                                  timeout=5).json()["sessionGroups"]
                if len(rows) >= count:
                    return rows
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"TensorBoard showed fewer than {count} HPARAMS rows within 60 s")
    finally:
        board.terminate()
        board.wait(timeout=30)


def test_a_run_resumed_with_more_epochs_shows_one_hparams_row_with_its_new_settings_and_result(data_dir, splits,
                                                                                               tmp_path):
    run_dir = tmp_path / "run"
    cfg = TrainConfig(train_subset=640, epochs=1, device="cpu", data_dir=str(data_dir), out=str(run_dir))
    fit(cfg, splits, CPU, run_dir)
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--threads", "1"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(list(run_dir.glob("events.out.tfevents.*.hparams"))) == 1
    [row] = hparams_rows(run_dir)
    assert row["hparams"]["epochs"] == 2  # not the first run's 1 beside the resumed run's result
    metrics = {m["name"]["tag"]: m["value"] for m in row["metricValues"]}
    assert metrics["hparam/test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-3)


def test_no_tensorboard_writes_no_events(data_dir, splits, tmp_path):
    run_dir = tmp_path / "run"
    cfg = TrainConfig(train_subset=500, epochs=1, tensorboard=False, device="cpu", data_dir=str(data_dir), out=str(run_dir))
    fit(cfg, splits, CPU, run_dir)
    assert not list(run_dir.glob("events.out.tfevents.*"))




# ---------------------------------------------------------------------------------------------------------------
# The thread policy (mnist train, lr-find and every sweep worker)


@pytest.mark.serial
@pytest.mark.slow  # it needs a quiet machine: make test-fast runs serial tests beside others
def test_threads_leave_out_the_cores_that_other_work_keeps_busy(monkeypatch, data_dir, tmp_path):
    from mnist_classifier.device import threads_per_job, usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = usable_cores()
    if cores < 2:
        pytest.skip("needs two cores: one to keep busy, one to measure")
    # a quiet machine (serial tests run alone): all cores, once any blip of a finishing neighbour has passed
    assert any(threads_per_job(1) == cores for _ in range(20))
    assert threads_per_job(2, sample=False) == cores // 2
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
    try:
        time.sleep(0.5)
        assert threads_per_job(1) == 1  # every core but one is busy: one thread, never more threads than cores free
        # the same through a real `mnist train`, whose summary.json records what torch trained with
        for flags, threads in (((), 1), (("--threads", "2"), 2)):  # --threads overrides the policy
            run = tmp_path / f"run{threads}"
            proc = run_cli("train", "--data-dir", str(data_dir), "--device", "cpu", "--train-subset", "256",
                           "--test-subset", "256", "--epochs", "1", "--out", str(run), *flags)
            assert proc.returncode == 0, proc.stderr
            assert json.loads((run / "summary.json").read_text())["threads"] == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads_per_job(1) == 3  # the user's override wins
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_lr_find_refuses_a_bad_range_with_one_line(data_dir, tmp_path, capsys):
    code = main(["lr-find", "--data-dir", str(data_dir), "--device", "cpu", "--start", "1", "--end", "0.1",
                 "--plot", str(tmp_path / "lr.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--start and --end must satisfy 0 < start < end" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lr.png").exists()
