"""Shared fixtures. Tests use the real MNIST files, fetched once into the repo's data/ folder
(or MNIST_TEST_DATA_DIR), exactly as `make run` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import ensure_mnist, load_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("MNIST_TEST_DATA_DIR", REPO / "data"))
    ensure_mnist(path)
    return path


@pytest.fixture(scope="session")
def splits(data_dir):
    return load_mnist(data_dir, download=False)


@pytest.fixture
def small_cfg(data_dir, tmp_path) -> TrainConfig:
    """The real default config, shrunk: 2,000 training images, 1 epoch, CPU, output in tmp_path."""
    return TrainConfig(epochs=1, train_subset=2000, device="cpu", data_dir=str(data_dir), out=str(tmp_path / "run"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m mnist_classifier ARGS` as a real process."""
    return subprocess.run([sys.executable, "-m", "mnist_classifier", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout)


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)
