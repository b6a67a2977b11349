import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mnist_classifier.config import TrainConfig
from mnist_classifier.evaluation import evaluate_checkpoints
from mnist_classifier.models import checkpoint
from mnist_classifier.training import fit, load_resume
from mnist_classifier.training.optim import make_optimizer

CPU = torch.device("cpu")


def _evaluate_checkpoint(path, splits):
    """What `mnist evaluate` reports for the checkpoint, as a dict."""
    return evaluate_checkpoints([path], device=CPU, splits=splits).to_dict()


@pytest.mark.accuracy
def test_short_run_writes_the_run_folder_and_reloads_exactly(small_cfg, splits):
    run_dir = Path(small_cfg.out)
    run_dir.mkdir(parents=True)
    summary = fit(small_cfg, splits, CPU, run_dir)
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "metrics.csv", "summary.json", "model.pt", "last.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]

    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "train_seconds", "total_seconds", "epochs", "params", "device", "seed"):
        assert key in saved
    assert saved["params"] == 206_922 and saved["epochs"] == 1
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and set(rows[0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "lr", "seconds"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["batch_size"] == 64 and config["environment"]["torch"] == torch.__version__

    # 2,000 images for one epoch already beat chance by far: seeds 0-4 x OMP_NUM_THREADS 1, 2, 3 gave
    # 75.33-85.68 % (mean 81.02, sd 3.91; the seed decides); benchmarks/test_margins.py --cases small
    assert summary["test_accuracy"] > 70
    reloaded = _evaluate_checkpoint(run_dir / "model.pt", splits)
    assert reloaded["accuracy"] == summary["test_accuracy"]
    assert round(reloaded["loss"], 6) == summary["test_loss"]


def test_checkpoint_contents(small_cfg, splits, tmp_path):
    run_dir = Path(small_cfg.out)
    run_dir.mkdir(parents=True)
    fit(small_cfg, splits, CPU, run_dir)
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    assert payload["format_version"] == checkpoint.FORMAT_VERSION
    assert payload["model"]["name"] == "guide-cnn"
    assert payload["dataset"]["mean"] == [0.1307] and payload["dataset"]["class_names"] == [str(d) for d in range(10)]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["state_dict"])
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert {"optimizer", "epoch", "rng", "train_config", "metrics"} <= set(last)


def test_same_seed_same_weights_on_cpu(small_cfg, splits, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        fit(dataclasses.replace(small_cfg, out=str(d)), splits, CPU, d)
    wa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_gives_bit_identical_weights(small_cfg, splits, tmp_path):
    cfg = dataclasses.replace(small_cfg, epochs=2, train_subset=1000, dropout=0.25)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for d in (straight, resumed):
        d.mkdir()
    fit(cfg, splits, CPU, straight)
    fit(dataclasses.replace(cfg, epochs=1, out=str(resumed)), splits, CPU, resumed)
    saved_cfg, payload = load_resume(resumed)
    assert saved_cfg.epochs == 1 and payload["epoch"] == 1
    fit(dataclasses.replace(saved_cfg, epochs=2), splits, CPU, resumed, resume=payload)
    wa = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(resumed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((straight / "metrics.csv").open())]
    rows_b = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader((resumed / "metrics.csv").open())]
    assert rows_a == rows_b


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_betas_reach_the_optimizer_and_flags_given_with_resume_win(optimizer):
    """--adam-beta1/2 set torch's betas, which change where two steps on the same gradients lead. A resumed
    run's optimizer loads the saved betas; the flags given with --resume replace them, as --lr and --momentum."""
    from mnist_classifier.training.session import restore

    def two_steps(cfg: TrainConfig) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        w = torch.nn.Parameter(torch.zeros(3))
        opt = make_optimizer(cfg, [{"params": [w], "lr_scale": 1.0}], CPU)
        for g in (torch.tensor([1.0, -2.0, 4.0]), torch.tensor([-1.0, 1.0, 0.5])):
            w.grad = g.clone()
            opt.step()
        return w.detach(), opt

    default, _ = two_steps(TrainConfig(optimizer=optimizer, lr=0.1))
    short, opt = two_steps(TrainConfig(optimizer=optimizer, lr=0.1, adam_beta1=0.5, adam_beta2=0.9))
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert not torch.allclose(default, short)
    assert TrainConfig().adam_beta1 == 0.9 and TrainConfig().adam_beta2 == 0.999  # torch's: the guide's Adam

    model = torch.nn.Linear(2, 2)
    saved = make_optimizer(TrainConfig(optimizer=optimizer, adam_beta1=0.5, adam_beta2=0.9), model.parameters(), CPU)
    payload = {"state_dict": model.state_dict(), "optimizer": saved.state_dict(),
               "rng": {"torch": torch.get_rng_state()}, "epoch": 1, "metrics": []}
    resumed_cfg = TrainConfig(optimizer=optimizer, adam_beta1=0.8, adam_beta2=0.99)
    fresh = make_optimizer(TrainConfig(optimizer=optimizer), model.parameters(), CPU)
    restore(payload, resumed_cfg, model, fresh, None, CPU)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.99)


@pytest.mark.accuracy
@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_other_optimizers_train(small_cfg, splits, optimizer):
    run_dir = Path(small_cfg.out)
    run_dir.mkdir(parents=True)
    # Seeds 0-4 x OMP_NUM_THREADS 1, 2, 3 (benchmarks/test_margins.py --cases sgd rmsprop): sgd at 0.05 ended
    # at 26 % for seed 3 and rmsprop at 0.001 at 10 % for seed 4 (a bad start that never recovers in 31
    # steps), so the rates are gentler: sgd 0.01 gave 57.19-68.67 % (mean 62.46, sd 4.92), rmsprop 0.0003
    # gave 91.02-92.33 % (mean 91.62, sd 0.54)
    lr, floor = {"sgd": (0.01, 45), "rmsprop": (0.0003, 80)}[optimizer]
    summary = fit(dataclasses.replace(small_cfg, optimizer=optimizer, lr=lr), splits, CPU, run_dir)
    assert summary["test_accuracy"] > floor


def test_fp32_precision_path(small_cfg, splits):
    run_dir = Path(small_cfg.out)
    run_dir.mkdir(parents=True)
    summary = fit(dataclasses.replace(small_cfg, precision="fp32", train_subset=500), splits, CPU, run_dir)
    assert json.loads((run_dir / "config.json").read_text())["autocast"] == "fp32"
    assert _evaluate_checkpoint(run_dir / "model.pt", splits)["accuracy"] == summary["test_accuracy"]


@pytest.mark.accuracy
@pytest.mark.slow
def test_full_default_run_reaches_98_2_percent(data_dir, tmp_path):
    """The guide recipe as `make run` runs it: 5 epochs on all 60,000 images, batch 64, Adam 0.001, on CPU."""
    from conftest import cli_in_process, run_cli

    out = tmp_path / "full"
    proc = run_cli("train", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 5 and summary["params"] == 206_922
    # benchmarks/test_margins.py --cases guide, seeds 0-4 x 1 and 2 threads, with the CPU kernels (AMD EPYC Zen 4,
    # bf16, 2026-12-05): 98.54-99.05 %, mean 98.90, sd 0.16; in fp32 (--precision fp32, seeds 0-4, 2 threads,
    # benchmarks/recipes.py) 98.47-99.00 %. Seed 0's fifth epoch dips below its fourth in most settings (98.83 ->
    # 98.47 % in fp32). Before the kernels (Intel Xeon without AMX): 98.76-99.07 %. 98.2 is 4.4 sd below the mean
    assert summary["test_accuracy"] >= 98.2
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Using device: cpu")
    assert sum(1 for line in lines if line.startswith("Epoch") and "Accuracy:" in line) == 5
    assert sum(1 for line in lines if "Loss:" in line) >= 5 * 9  # every 100 of the 938 batches
    assert lines[-1] == f"Run folder: {out}"
    proc = cli_in_process("evaluate", "--checkpoint", str(out / "model.pt"), "--data-dir", str(data_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == summary["test_accuracy"]
