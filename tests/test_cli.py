import gc
import os
import re
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_in_process, run_cli
from mnist_classifier.cli import entry, main


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--lr", "nan"], "--lr must be > 0, got nan"),
        (["--model", "resnet9000"], "unknown model"),
        (["--optimizer", "lbfgs"], "invalid choice"),
        (["--epochs", "two"], "invalid int value"),
        (["--resume", "/nonexistent/run"], "no such run folder"),
        (["--model", "efficientnet-lite0", "--pretrained", "--whiten-init"], "--whiten-init would overwrite"),
        (["--seed", "99999999999999999999"], "--seed must be in [0, 4294967295], got 99999999999999999999"),
        (["--dist-timeout", "1e308"], "--dist-timeout must be in (0, 604800], got 1e+308"),
    ],
)
def test_train_rejects_bad_values_with_one_line(flags, fragment, capsys, tmp_path):
    try:
        code = main(["train", "--out", str(tmp_path / "r"), *flags])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_unavailable_device_is_exit_2(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "not available" in capsys.readouterr().err


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1


def test_checkpoint_that_runs_code_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "mnist-classifier", "x": Payload()}, evil)
    assert main(["evaluate", "--checkpoint", str(evil)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_evaluate_json_in_a_real_process(data_dir, trained_checkpoint):
    summary = json.loads((trained_checkpoint.parent / "summary.json").read_text())  # what training measured
    proc = run_cli("evaluate", "--checkpoint", str(trained_checkpoint), "--data-dir", str(data_dir), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n"] == 10000 and len(result["per_class_accuracy"]) == 10
    assert result["accuracy"] == summary["test_accuracy"]
    assert {"loss", "accuracy"} <= set(result)
    low, high = result["accuracy_ci95"]  # what the 10,000 test images alone allow: about +-0.2 points near 99 %
    assert low < result["accuracy"] < high and 0.2 < high - low < 0.6


def test_a_class_without_test_images_is_null_in_the_json_and_said_in_the_table(data_dir, trained_checkpoint):
    """Scoring a test subset without some class printed "nan%" and wrote NaN into --json, which is not JSON."""
    args = ("evaluate", "--checkpoint", str(trained_checkpoint), "--data-dir", str(data_dir), "--device", "cpu",
            "--test-subset", "1")  # the first test image is a 7
    proc = cli_in_process(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert result["per_class_accuracy"][7] in (0.0, 100.0) and result["per_class_accuracy"].count(None) == 9
    table = cli_in_process(*args).stdout
    assert table.count("no test images") == 9 and "nan" not in table.lower()


def test_an_ensemble_refuses_a_member_with_the_same_weights_as_another(data_dir, trained_checkpoint, tmp_path):
    """``a/model.pt ./a/model.pt`` (or a run's model.pt beside its last.pt) averaged copies of one model and
    reported them as an ensemble of two."""
    run = trained_checkpoint.parent
    copy = tmp_path / "copy.pt"
    copy.write_bytes(trained_checkpoint.read_bytes())
    for other in (f"{run}/./model.pt", run / "last.pt", copy):
        proc = cli_in_process("evaluate", "--checkpoint", str(trained_checkpoint), str(other), "--data-dir",
                              str(data_dir), "--device", "cpu")
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.strip() == (f"mnist evaluate: error: {other} holds the same weights as "
                                       f"{trained_checkpoint}; an ensemble averages different models")


def test_the_accuracy_interval_is_wilsons_and_stays_inside_0_to_100():
    from mnist_classifier.evaluation.metrics import wilson_interval

    # worked by hand from Wilson's formula, z = 1.96
    assert wilson_interval(7900, 10000) == pytest.approx((78.1906, 79.7871), abs=1e-3)
    assert wilson_interval(10000, 10000) == pytest.approx((99.9616, 100.0), abs=1e-3)  # p +- z se: a width of 0
    assert wilson_interval(0, 24) == pytest.approx((0.0, 13.8), abs=0.05)
    assert wilson_interval(0, 0) == (0.0, 100.0)  # no images: nothing is known


def test_bad_value_in_a_real_process_has_no_traceback(tmp_path):
    proc = run_cli("train", "--epochs", "-1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_data_command(data_dir):
    proc = run_cli("data", "--data-dir", str(data_dir))
    assert proc.returncode == 0
    assert "md5 ok" in proc.stdout and str(data_dir.resolve()) in proc.stdout


def test_python_dash_m_and_console_script_agree():
    import shutil

    proc = run_cli("--version")
    assert proc.returncode == 0 and "mnist-classifier" in proc.stdout
    script = shutil.which("mnist")
    if script:
        import subprocess

        assert subprocess.run([script, "--version"], capture_output=True, text=True).stdout == proc.stdout


def test_console_entry_runs_the_command_then_freezes_the_collector(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mnist", "models"])
    gc.unfreeze()
    try:
        assert entry() == 0
        assert gc.get_freeze_count() > 0  # the objects alive now are left out of the exit-time collections
    finally:
        gc.unfreeze()
    assert "guide-cnn" in capsys.readouterr().out


# Counts full (generation 2) collections in a fresh interpreter while `mnist --version` starts one way or the other.
FULL_COLLECTIONS = """
import gc, sys
full = [0]
gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (phase == "stop" and info["generation"] == 2)))
how, sys.argv = sys.argv[1], ["mnist", "--version"]  # argparse prints the version and exits: the import is the work
try:
    if how == "run":
        from mnist_classifier.__main__ import run
        run()
    else:
        from mnist_classifier.cli import entry
        entry()
except SystemExit as done:
    print(full[0], gc.isenabled(), done.code)
"""


def test_the_mnist_script_imports_torch_without_full_collections():
    """Importing the command line (torch among it) made the collector walk every object alive several times;
    started through ``run``, as the `mnist` script and ``python -m mnist_classifier`` are, it makes none, and
    the collector is on again for the command itself."""
    import subprocess

    counts = {}
    for how in ("entry", "run"):
        out = subprocess.run([sys.executable, "-c", FULL_COLLECTIONS, how], capture_output=True, text=True, check=True)
        full, enabled, code = out.stdout.split()[-3:]  # after the version line
        assert (enabled, code) == ("True", "0")
        counts[how] = int(full)
    assert counts["entry"] >= 1 and counts["run"] == 0


def test_console_entry_keeps_the_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mnist", "evaluate", "--checkpoint", "/nonexistent/model.pt"])
    try:
        assert entry() == 2
    finally:
        gc.unfreeze()
    assert "error" in capsys.readouterr().err


def test_a_reader_that_leaves_early_stops_the_command_quietly(trained_checkpoint, splits, tmp_path):
    """`mnist predict DIR | head -1`: a BrokenPipeError traceback before 2026-12-05; now status 141 and no output
    on stderr, as Unix tools end. 1,500 files print ~100 KB, more than a pipe holds, so the write must fail."""
    import shutil

    from PIL import Image

    folder = tmp_path / "digits"
    folder.mkdir()
    Image.fromarray(splits.test_images[0, 0].numpy()).save(folder / "0.png")
    for i in range(1, 1500):
        shutil.copyfile(folder / "0.png", folder / f"{i}.png")
    with open(tmp_path / "stderr", "w") as err:
        command = [sys.executable, "-m", "mnist_classifier", "predict", str(folder), "--checkpoint",
                   str(trained_checkpoint), "--device", "cpu"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, cwd=REPO)
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader leaves, as `head -1` does
        code = proc.wait(timeout=120)
    assert first.startswith(str(folder).encode()) and code == 141
    assert (tmp_path / "stderr").read_text() == ""


@pytest.mark.skipif(not hasattr(os, "forkpty"), reason="a pseudo-terminal")
def test_training_on_a_terminal_that_reports_no_size_still_shows_its_progress_bar(data_dir, tmp_path):
    """A pseudo-terminal nobody sized (`docker run -t`, a script's) reports 0 rows and 0 columns. tqdm then drew
    no bar at all, so a long epoch showed nothing until it ended (seen 2026-12-06); now it draws 80 columns."""
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child, on the unsized pseudo-terminal; COLUMNS and LINES would size it instead
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "mnist_classifier", "train", "--epochs", "1",
                                   "--train-subset", "3200", "--test-subset", "500", "--device", "cpu",
                                   "--data-dir", str(data_dir), "--out", str(tmp_path / "run")], env)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 1 << 16)
        except OSError:  # EIO: the child has gone and the terminal hung up
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, shown[-2000:]
    assert re.search(rb"Epoch 1: +\d+%\|.*\| +\d+/50 ", shown), shown[-2000:]  # 3200 images, batch 64
