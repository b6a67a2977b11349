"""Precise batch norm: a run hands back the model it trained, with statistics that belong to its weights."""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import model_input
from mnist_classifier.evaluation import clearly_below, evaluate_model, final_drop
from mnist_classifier.models import ModelConfig, build_model, checkpoint
from mnist_classifier.training import fit
from mnist_classifier.training import session as session_module
from mnist_classifier.training.epoch import epoch_permutation
from mnist_classifier.training.precise_bn import live_batch_norms, recalibrate, sample_batches

from conftest import REPO, run_cli

CPU = torch.device("cpu")
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _bn_cfg(data_dir, out, **kw) -> TrainConfig:
    """fast-cnn (two batch-norm layers) on 2,000 MNIST images for one epoch: about 1 s."""
    return TrainConfig(model="fast-cnn", epochs=1, batch_size=64, lr=0.01, train_subset=2000, device="cpu",
                       data_dir=str(data_dir), out=str(out), **kw)


def _stale_models(monkeypatch) -> None:
    """Every model fit builds gets batch norm with momentum 0 and running statistics (mean 1, variance 16)
    that belong to no weights: they never move, as stale as statistics can be."""
    real = session_module.build_model

    def stale(mcfg):
        model = real(mcfg)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0
                m.running_mean.fill_(1.0), m.running_var.fill_(16.0)
        return model

    monkeypatch.setattr(session_module, "build_model", stale)


def _reference_recalibration(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The same statistics computed by torch's own ``update_bn`` (SWA's helper), as an independent check, on
    the batches a run of batch size 64 uses: ceil(N / 64) near-equal slices."""
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn([(b,) for b in torch.tensor_split(images, -(-len(images) // 64))], ref)
    return ref.eval()


@pytest.mark.accuracy
def test_stale_statistics_are_replaced_so_eval_mode_scores_what_the_weights_learned(monkeypatch, data_dir, splits, tmp_path):
    _stale_models(monkeypatch)
    test_x = model_input(splits.test_images, MNIST_MEAN, MNIST_STD, CPU)
    train_x = model_input(splits.train_images[:2000], MNIST_MEAN, MNIST_STD, CPU)
    scores = {}
    for n in (0, 10_000):
        run = tmp_path / f"bn{n}"
        summary = fit(_bn_cfg(data_dir, run, precise_bn=n), splits, CPU, run)
        model = build_model(ModelConfig(name="fast-cnn"))
        model.load_state_dict(checkpoint.load(run / "model.pt")["state_dict"])
        recalibrated = _reference_recalibration(model, train_x[epoch_permutation(2000, 0, 1)])
        scores[n] = (summary["test_accuracy"], evaluate_model(model, test_x, splits.test_labels)["accuracy"],
                     evaluate_model(recalibrated, test_x, splits.test_labels)["accuracy"])
    stale_summary, stale_eval, stale_recal = scores[0]
    precise_summary, precise_eval, precise_recal = scores[10_000]
    # the same weights either way (seed 0): only the statistics differ
    assert stale_recal == precise_recal
    # without precise BN the stored statistics are the initial ones and eval mode falls far behind the weights
    assert stale_summary == stale_eval and stale_eval < stale_recal - 30
    # with it, the run's figure, model.pt in eval mode and torch's update_bn agree within a few images
    assert precise_summary == precise_eval and abs(precise_eval - precise_recal) <= 0.1 and precise_eval > 85


def test_precise_bn_changes_statistics_and_never_weights(data_dir, splits, tmp_path):
    states = {}
    for n in (0, 10_000):
        run = tmp_path / f"bn{n}"
        fit(_bn_cfg(data_dir, run, precise_bn=n, augment=True, dropout=0.2), splits, CPU, run)
        states[n] = checkpoint.load(run / "model.pt")["state_dict"]
    params = {k for k in states[0] if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(states[0][k], states[10_000][k]) for k in params)
    assert not torch.equal(states[0]["features.1.2.running_var"], states[10_000]["features.1.2.running_var"])


def test_recalibrate_matches_torch_update_bn_and_restores_the_model(splits):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="bn-cnn", dropout=0.0))
    images = model_input(splits.train_images[:512], MNIST_MEAN, MNIST_STD, CPU)
    momenta = [m.momentum for m in live_batch_norms(model)]
    model.train()
    assert recalibrate(model, sample_batches(images, torch.arange(512), 64)) == 6  # 5 conv + 1 linear batch norms
    assert model.training and [m.momentum for m in live_batch_norms(model)] == momenta
    ref = _reference_recalibration(model, images)
    for mine, theirs in zip(live_batch_norms(model), live_batch_norms(ref)):
        assert torch.allclose(mine.running_mean, theirs.running_mean, atol=1e-5)
        assert torch.allclose(mine.running_var, theirs.running_var, rtol=1e-4, atol=1e-5)


def test_dropout_is_off_during_the_pass(splits):
    """Dropout before a batch norm would inflate its variance; evaluation runs without dropout, so must the pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 8), nn.BatchNorm1d(8))
    images = model_input(splits.train_images[:256], MNIST_MEAN, MNIST_STD, CPU)
    recalibrate(model, sample_batches(images, torch.arange(256), 256))
    with torch.no_grad():
        features = model[2](model[0](images))  # (256, 8) what the batch norm sees in evaluation
    assert torch.allclose(model[3].running_var, features.var(0), rtol=1e-4)


def test_sample_batches_never_yield_a_lone_image():
    images = torch.arange(10.0).view(10, 1)
    sizes = [len(b) for b in sample_batches(images, torch.arange(5), 4)]
    assert sizes == [3, 2] and [len(b) for b in sample_batches(images, torch.arange(1), 4)] == []


def test_a_model_without_batch_norm_is_untouched(splits):
    model = build_model(ModelConfig(name="guide-cnn"))
    before = copy.deepcopy(model.state_dict())
    images = model_input(splits.train_images[:64], MNIST_MEAN, MNIST_STD, CPU)
    assert recalibrate(model, sample_batches(images, torch.arange(64), 32)) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_frozen_imagenet_batch_norm_is_left_alone():
    pytest.importorskip("timm")
    model = build_model(ModelConfig(name="efficientnet-lite0", in_channels=1, image_size=28, input_size=32))
    assert len(live_batch_norms(model)) > 40
    model.keep_bn_stats = True  # --pretrained without --train-bn: ImageNet's statistics are kept
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert live_batch_norms(model) == []
    assert recalibrate(model, iter([torch.rand(4, 1, 28, 28)])) == 0
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_the_ema_weights_get_their_own_statistics(data_dir, splits, tmp_path):
    """--ema copies the raw model's statistics into the average at every step; precise BN recomputes them
    for the averaged weights that model.pt holds."""
    run = tmp_path / "ema"
    summary = fit(_bn_cfg(data_dir, run, ema=0.99), splits, CPU, run)
    saved = checkpoint.load(run / "model.pt")["state_dict"]
    raw = checkpoint.load(run / "last.pt")["state_dict"]
    assert not torch.equal(saved["features.1.2.running_mean"], raw["features.1.2.running_mean"])
    model = build_model(ModelConfig(name="fast-cnn"))
    model.load_state_dict(saved)
    train_x = model_input(splits.train_images[:2000], MNIST_MEAN, MNIST_STD, CPU)
    ref = _reference_recalibration(model, train_x[epoch_permutation(2000, 0, 1)])
    assert torch.allclose(saved["features.1.2.running_mean"], ref.features[1][2].running_mean, atol=1e-5)
    assert summary["precise_bn_seconds"] > 0


def test_clearly_below_needs_more_than_noise():
    assert clearly_below(100.0, 41.67, 24)  # issue 22's shapes run: 58 points on 24 images
    assert not clearly_below(100.0, 87.5, 24)  # 3 images of 24: within two standard errors
    assert clearly_below(99.2, 98.5, 10_000) and not clearly_below(99.2, 98.9, 10_000)
    rows = [{"epoch": e, "val_accuracy": a} for e, a in ((1, 90.0), (2, 99.0), (3, 95.0))]
    assert final_drop(rows, "val", 5000) == {"split": "val", "best_epoch": 2, "best_accuracy": 99.0,
                                             "final_epoch": 3, "final_accuracy": 95.0}
    assert final_drop(rows[:2], "val", 5000) is None and final_drop(rows[:1], "val", 5000) is None


@pytest.mark.slow
def test_a_run_that_ends_worse_says_so_in_one_line(data_dir, tmp_path):
    """Resumed at a learning rate 100 times too high, the last epoch falls far below the first: the run keeps
    the last model (no validation split, so the test set may not choose) but says so, pointing to --val-size."""
    run = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--device", "cpu", "--train-subset", "2000", "--optimizer", "sgd",
              "--momentum", "0"]
    assert run_cli("train", "--epochs", "1", "--lr", "0.05", "--out", str(run), *common).returncode == 0
    proc = run_cli("train", "--resume", str(run), "--epochs", "2", "--lr", "5", *common)
    summary = json.loads((run / "summary.json").read_text())
    rows = (run / "metrics.csv").read_text().splitlines()
    assert proc.returncode == 0, proc.stderr
    assert summary["final_drop"]["best_epoch"] == 1 and summary["final_drop"]["split"] == "test", rows
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "epoch 2 scored" in warnings[0] and "--val-size" in warnings[0]
    assert "Traceback" not in proc.stderr
