from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import cli_in_process, run_cli
from mnist_classifier.evaluation.plots import most_confused, plot_confusion, plot_samples, save_figure

PNGS = ["samples.png", "predictions.png", "curves.png", "confusion.png", "mistakes.png"]


def _is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.slow
def test_train_with_plots_writes_every_picture(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--epochs", "2", "--train-subset", "3000", "--device", "cpu", "--plots",
                   "--data-dir", str(data_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in PNGS:
        w, h = _is_png(out / name)
        assert w > 400 and h > 200
        assert f"Wrote {out / name}" in proc.stdout


def test_plot_command_on_an_existing_run(data_dir, tmp_path, trained_checkpoint):
    import shutil

    run = tmp_path / "run"  # a copy of the suite's trained run folder: the plots are written into it
    shutil.copytree(trained_checkpoint.parent, run)
    proc = cli_in_process("plot", "--run", str(run), "--data-dir", str(data_dir), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert all((run / n).is_file() for n in PNGS)
    assert not list(run.glob(".*.tmp"))


def test_plot_command_rejects_a_folder_without_a_model(tmp_path):
    proc = run_cli("plot", "--run", str(tmp_path))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_most_confused_pairs():
    cm = torch.tensor([[5, 2, 0], [7, 9, 1], [0, 0, 3]])
    assert most_confused(cm, ["a", "b", "c"], k=2) == [("b", "a", 7), ("a", "b", 2)]


def test_figures_render_without_a_display(tmp_path):
    fig = plot_samples(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2]), [str(i) for i in range(10)])
    assert _is_png(save_figure(fig, tmp_path / "s.png"))[0] > 100
    cm = torch.eye(10, dtype=torch.int64) * 100
    cm[3, 5] = 4
    assert _is_png(save_figure(plot_confusion(cm, [str(i) for i in range(10)]), tmp_path / "c.png"))[0] > 100
