"""torchrun + DistributedDataParallel on CPU: two gloo processes on loopback, real MNIST."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import REPO, as_from_a_terminal, cli_in_process, free_port
from mnist_classifier.training import stop_requests

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(logs, *args, nproc=2):
    return [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
            str(free_port()), "--log-dir", str(logs), "-m", "mnist_classifier", "train", *args]


def torchrun(*args, nproc=2, cwd=None, timeout=600, env=None):
    # torchrun's log folder: without --log-dir it makes /tmp/torchelastic_* per run and never removes it
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as logs:
        return subprocess.run(torchrun_command(logs, *args, nproc=nproc), capture_output=True, text=True,
                              cwd=cwd or REPO, timeout=timeout, env={**os.environ, **(env or {})})


def stopped_at_batch_40(cmd, signal_to):
    """Start ``cmd`` (torchrun, in a session of its own, as from a terminal) and, once rank 0 reports batch 40
    of epoch 1, call ``signal_to(torchrun's process, its two ranks' pids)``; return (exit status, all output)."""
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                           start_new_session=True, preexec_fn=as_from_a_terminal)
    seen = []
    for line in job.stdout:
        seen.append(line)
        if line.startswith("Epoch 1 [") and "2624/" in line:  # 41 batches of 64 done
            ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
            assert len(ranks) == 2, seen
            signal_to(job, [int(pid) for pid in ranks])
            break
    rest, _ = job.communicate(timeout=180)
    return job.returncode, "".join(seen) + rest


def weights_and_metrics(run):
    last = torch.load(run / "last.pt", weights_only=True)
    metrics = [{k: v for k, v in row.items() if k != "seconds"} for row in last["metrics"]]
    return {k: last[k] for k in ("state_dict", "ema_state_dict")}, metrics


@pytest.mark.accuracy
@pytest.mark.slow
def test_two_processes_train_one_model(data_dir, tmp_path):
    proc = torchrun("--epochs", "1", "--device", "cpu", "--data-dir", str(data_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # only rank 0 writes a run folder
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_identical_across_ranks"] is True
    # one epoch of the guide recipe in one process: 98.13-98.42 % over seeds 0-4 (mean 98.31, sd 0.11; Intel Xeon
    # without AMX, benchmarks/test_margins.py --cases guide-1-epoch); two processes train the same model
    assert summary["test_accuracy"] >= 97.5
    assert proc.stdout.count("Using device:") == 1  # only rank 0 prints
    assert "Processes: 2 (global batch 64, 32 images per process per step)" in proc.stdout
    state = torch.load(runs[0] / "model.pt", weights_only=True)["state_dict"]
    assert not any(k.startswith("module.") for k in state)


@pytest.mark.accuracy
@pytest.mark.slow
def test_resume_a_two_process_run_and_evaluate_it_in_one(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--device", "cpu", "--data-dir", str(data_dir), "--train-subset", "6000"]
    first = torchrun("--epochs", "1", "--out", str(out), *common)
    assert first.returncode == 0, first.stderr[-2000:]
    second = torchrun("--resume", str(out), "--epochs", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Resuming at epoch 2 of 2" in second.stdout
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs
    ev = cli_in_process("evaluate", "--checkpoint", str(out / "model.pt"), "--data-dir", str(data_dir), "--json", "--device", "cpu")
    assert ev.returncode == 0 and json.loads(ev.stdout)["accuracy"] > 90
    # and the other way round: a single-process run resumed under torchrun
    single = tmp_path / "single"
    assert cli_in_process("train", "--epochs", "1", "--out", str(single), *common).returncode == 0
    resumed = torchrun("--resume", str(single), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.slow  # torchrun starts two processes: 6-10 s
def test_batch_that_does_not_split_is_refused(data_dir, tmp_path):
    proc = torchrun("--batch-size", "63", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert "does not split evenly over 2 processes" in proc.stderr


@pytest.mark.slow
def test_wrong_rendezvous_fails_clearly_instead_of_hanging(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # nobody listens there
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mnist_classifier", "train", "--device", "cpu", "--dist-timeout", "5",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - t0 < 100
    assert "could not join the process group at 127.0.0.1:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_rank_dying_mid_run_ends_the_job(data_dir, tmp_path):
    cmd = [*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--log-dir", str(tmp_path / "logs"), "-m", "mnist_classifier", "train", "--epochs", "3", "--device", "cpu", "--data-dir", str(data_dir),
           "--dist-timeout", "30", "--out", str(tmp_path / "r")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    seen = []
    for line in job.stdout:  # wait until training is under way
        seen.append(line)
        if "Loss:" in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, seen
    os.kill(int(workers[-1]), signal.SIGKILL)
    t0 = time.monotonic()
    job.wait(timeout=180)
    assert job.returncode != 0 and time.monotonic() - t0 < 170


@pytest.mark.slow
def test_two_nodes_rendezvous_over_c10d(data_dir, tmp_path):
    """`--nnodes 2 --rdzv-endpoint`: two torchrun agents (standing in for two machines) on loopback."""
    port = free_port()
    out = tmp_path / "run"
    agents = [
        subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mnist-test", "--node-rank", str(node),
                          "--log-dir", str(tmp_path / f"logs-{node}"), "-m", "mnist_classifier", "train", "--epochs", "1", "--train-subset", "4000", "--device", "cpu",
                          "--data-dir", str(data_dir), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for node in (0, 1)
    ]
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_identical_across_ranks"] is True


@pytest.mark.slow
def test_precise_bn_pools_the_statistics_of_every_process(data_dir, tmp_path):
    """fast-cnn under torchrun: each process recomputes batch norm's statistics on its share of the images and
    the shares are pooled, so every process holds the same buffers, and they are those of all the images."""
    from mnist_classifier.data import load_mnist, model_input
    from mnist_classifier.models import ModelConfig, build_model, checkpoint
    from mnist_classifier.training.epoch import epoch_permutation

    out = tmp_path / "run"
    proc = torchrun("--model", "fast-cnn", "--epochs", "1", "--train-subset", "4000", "--batch-size", "128",
                    "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_identical_across_ranks"] is True and summary["precise_bn_seconds"] > 0  # buffers too
    saved = checkpoint.load(out / "model.pt")["state_dict"]
    # the first batch norm sees conv + pool outputs, which no other image in a batch changes: its pooled mean
    # and variance must be those of the first 4,000 images of epoch 1's shuffle, whichever process saw them
    splits = load_mnist(data_dir, download=False)
    x = model_input(splits.train_images[:4000], (0.1307,), (0.3081,), torch.device("cpu"))[epoch_permutation(4000, 0, 1)]
    model = build_model(ModelConfig(name="fast-cnn"))
    model.load_state_dict(saved)
    with torch.no_grad():
        features = model.features[1][1](model.features[1][0](model.features[0](x)))  # (4000, 32, 7, 7)
    assert torch.allclose(saved["features.1.2.running_mean"], features.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(saved["features.1.2.running_var"], features.var((0, 2, 3)), rtol=2e-2)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step_and_resume_is_exact(data_dir, tmp_path):
    """A Ctrl-C in torchrun's terminal reaches every rank, and torchrun passes it on once more. Before 2026-12-07
    each rank died at once ("interrupted", exit 130) and the epoch in flight was lost. Now the ranks agree after
    every step, all stop after the same one, rank 0 saves last.pt with its place in the epoch (the loss and image
    count of both ranks) and says so once; the resumed run ends with the weights, EMA weights and metrics of an
    uninterrupted one, bit for bit. The stem freezes halfway (--stem-fraction 0.5), after the stop: the resumed
    ranks freeze it at the same step, and DDP, which then finds it unused, leaves it as it is."""
    common = ["--epochs", "1", "--train-subset", "12800", "--device", "cpu", "--data-dir", str(data_dir),
              "--augment", "--ema", "0.99", "--log-every", "20", "--test-subset", "1000", "--stem-fraction", "0.5"]
    straight = torchrun(*common, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    # the stem (conv1) froze after 100 of the 200 steps; DDP left its gradients None from then on
    adam = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert [int(adam[i]["step"]) for i in sorted(adam)] == [100, 100, 200, 200, 200, 200, 200, 200]
    run = tmp_path / "interrupted"
    status, out = stopped_at_batch_40(torchrun_command(tmp_path / "logs", *common, "--out", str(run)),
                                      lambda job, ranks: os.killpg(job.pid, signal.SIGINT))
    assert status != 0, out[-3000:]  # torchrun's own status for a job a signal stopped
    said = re.findall(r"mnist train: interrupted at epoch 1, batch (\d+) of 200; saved (\S+)\. Continue with: "
                      r"the same torchrun command with -m mnist_classifier train --resume (\S+)", out)
    assert len(said) == 1 and said[0][1:] == (str(run / "last.pt"), str(run)), out[-3000:]
    assert "KeyboardInterrupt" not in out and out.count("mnist train:") == 1, out[-3000:]
    partial = torch.load(run / "last.pt", weights_only=True)["partial"]
    done = int(said[0][0])
    assert partial["batches_done"] == done and 40 < done < 200
    assert partial["seen"] == done * 64  # both ranks' images: 32 each per step
    resumed = torchrun("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (a, metrics_a), (b, metrics_b) = weights_and_metrics(tmp_path / "straight"), weights_and_metrics(run)
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert metrics_a == metrics_b


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_them_all_and_one_process_resumes_the_run(data_dir, tmp_path):
    """`kill` of one rank alone: the other rank got no signal, but learns of it after the step and stops too,
    with the same exit status, so last.pt holds a consistent place in the epoch instead of the job dying with
    the other rank cut off mid-collective. A single process resumes it (checkpoints move between the two)."""
    run = tmp_path / "run"
    cmd = torchrun_command(tmp_path / "logs", "--epochs", "1", "--train-subset", "12800", "--device", "cpu",
                           "--data-dir", str(data_dir), "--log-every", "20", "--test-subset", "1000",
                           "--dist-timeout", "60", "--out", str(run))
    status, out = stopped_at_batch_40(cmd, lambda job, ranks: os.kill(ranks[1], signal.SIGTERM))
    assert status != 0 and out.count("mnist train: interrupted at epoch 1, batch") == 1, out[-3000:]
    # torchrun lists each failed rank: both stopped with SIGTERM's status, neither lost the other
    assert len(re.findall(r"exitcode\s*: 143 \(pid", out)) == 2 and "lost the other" not in out, out[-3000:]
    partial = torch.load(run / "last.pt", weights_only=True)["partial"]
    assert 40 < partial["batches_done"] < 200 and partial["seen"] == partial["batches_done"] * 64
    resumed = cli_in_process("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["test_accuracy"] > 90


def test_on_a_rank_a_repeated_signal_is_the_same_stop_not_a_second():
    """torchrun passes on the signal it gets, so a Ctrl-C in the terminal reaches each rank twice; the second
    must not stop the rank at once, as a second Ctrl-C does in one process (there it raises KeyboardInterrupt).
    Two signals that arrive while a rank is inside a step reach Python as one, so the end-to-end test above
    cannot tell; this one sends them apart. A rank that stopped stays deaf to them on its way out: once one rank
    has exited, torchrun sends SIGTERM to the others, and one still tearing down died of it (exit -15, seen in
    the reader test under a loaded `make test`)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even under `make test &`
    handlers = lambda: (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))  # noqa: E731
    try:
        with stop_requests(forwarded=True):
            pass
        assert handlers() == (signal.default_int_handler, before[signal.SIGTERM])  # no stop: put back
        try:
            with stop_requests(forwarded=True) as flag:
                for signum in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
                    os.kill(os.getpid(), signum)
                assert flag.signum == signal.SIGINT and flag.exit_status() == 130
        except KeyboardInterrupt:
            pytest.fail("the repeated SIGINT stopped the rank at once")
        assert handlers() == (signal.SIG_IGN, signal.SIG_IGN)  # stopped: deaf on its way out
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt), stop_requests() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            assert flag.is_set()
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # one process: put back
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_when_the_reader_of_torchruns_output_leaves_every_rank_stops_and_saves_its_place(data_dir, tmp_path):
    """`torchrun ... train | head`: rank 0's next line fails with EPIPE, which stops it after its step as a
    signal would (exit 141, 128 + SIGPIPE); rank 1, whose output nobody reads, learns of it from the vote."""
    run = tmp_path / "run"
    cmd = torchrun_command(tmp_path / "logs", "--epochs", "1", "--train-subset", "12800", "--device", "cpu",
                           "--data-dir", str(data_dir), "--log-every", "20", "--test-subset", "1000", "--out", str(run))
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in job.stdout:
        if line.startswith("Epoch 1 [") and "2624/" in line:  # 41 batches of 64 done: the reader leaves
            break
    job.stdout.close()
    _, err = job.communicate(timeout=180)
    assert err.count("mnist train: interrupted at epoch 1, batch") == 1, err[-3000:]
    assert len(re.findall(r"exitcode\s*: 141 \(pid", err)) == 2, err[-3000:]  # both ranks, as SIGPIPE stops
    partial = torch.load(run / "last.pt", weights_only=True)["partial"]
    assert 40 < partial["batches_done"] < 200 and partial["seen"] == partial["batches_done"] * 64


VOTER = """
import json, os, signal, sys
import torch.distributed as dist
from mnist_classifier.training.distributed import DistContext
from mnist_classifier.training.epoch import StopFlag
from mnist_classifier.training.fit import AgreedStop
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
ctx = DistContext(rank, 2, rank, dist.new_group(backend="gloo"))
stop = StopFlag(install=False)
stopping = AgreedStop(stop, ctx)
steps = [stopping()]  # step 1's vote: nobody has a signal
if rank == 1:
    stop.request(signal.SIGTERM)  # between steps 1 and 2, to rank 1 alone
steps += [stopping(), stopping()]  # step 2 reads step 1's vote; step 3 reads step 2's, which saw it
late = StopFlag(install=False)
settled_before = AgreedStop(late, ctx).settle()
if rank == 0:
    late.request(signal.SIGINT)  # after the last step, to rank 0 alone
settled = AgreedStop(late, ctx).settle()
print(json.dumps({"steps": steps, "signum": stop.signum, "settled": [settled_before, settled],
                  "late": late.signum}))
dist.destroy_process_group()
"""


def test_the_vote_stops_every_rank_one_step_after_any_got_a_signal_and_settles_a_late_one(tmp_path):
    """``AgreedStop`` between two real gloo processes: a stop requested on one rank alone is agreed by both
    one step later, with its signal; after the last step ``settle`` agrees at once."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", VOTER], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), [err[-2000:] for _, err in outs]
    for out, _ in outs:
        assert json.loads(out) == {"steps": [False, False, True], "signum": signal.SIGTERM,
                                   "settled": [False, True], "late": signal.SIGINT}
