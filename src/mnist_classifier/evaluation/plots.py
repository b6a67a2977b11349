"""Pictures of data, predictions and training, as matplotlib Figures.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so nothing needs a display and nothing
global changes; a notebook shows a returned Figure inline, the CLI writes it as PNG with ``save_figure``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from .. import fileio
from ..errors import UserError
from ..runs import PICTURES
from .metrics import confusion_matrix, read_metrics
from .scoring import predict_logits

RIGHT, WRONG = "#1a7f37", "#cf222e"  # green and red that stay readable on white


def _show(ax, image: torch.Tensor) -> None:
    """One (C, H, W) uint8 image on an axis: grey for one channel, RGB for three."""
    img = image.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)  # MNIST: white digit on black
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, max_cols: int = 5) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def image_grid(
    images: torch.Tensor, titles: Sequence[str], colors: Sequence[str] | None = None, title: str = "",
    max_cols: int = 5, framed: Sequence[bool] | None = None,
) -> Figure:
    """Images ``(N, C, H, W)`` uint8 in a grid, each with its title (and colour, and a red frame if ``framed``)."""
    rows, cols = _grid(len(images), max_cols)
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig = Figure(figsize=(1.9 * cols, (1.85 + 0.2 * lines) * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(images):
            ax.set_axis_off()
            continue
        _show(ax, images[i])
        ax.set_title(titles[i], fontsize=9 if lines > 1 else 10, color=colors[i] if colors else "black")
        if framed is not None and framed[i]:
            for spine in ax.spines.values():
                spine.set_edgecolor(WRONG)
                spine.set_linewidth(3)
    fig.suptitle(title, fontsize=12)
    return fig


def plot_samples(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], title: str = "Training samples") -> Figure:
    """A grid of images ``(N, C, H, W)`` uint8 with their labels."""
    return image_grid(images, [f"label: {class_names[int(y)]}" for y in labels], title=title)


def plot_predictions(
    images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, class_names: Sequence[str],
    title: str = "Test predictions (mistakes in red)",
) -> Figure:
    """Images with 'pred X / true Y'; wrong predictions in red with a red frame."""
    wrong = [int(p) != int(y) for p, y in zip(preds, labels)]
    titles = [f"pred {class_names[int(p)]}\ntrue {class_names[int(y)]}" for p, y in zip(preds, labels)]
    return image_grid(images, titles, [WRONG if w else RIGHT for w in wrong], title, framed=wrong)


def plot_curves(rows: Sequence[dict[str, Any]], title: str = "Training curves") -> Figure:
    """Train and test loss, and test accuracy, per epoch (rows as in metrics.csv)."""
    split = "val" if rows and "val_loss" in rows[0] else "test"  # runs with --val-size never test per epoch
    columns = ("epoch", "train_loss", f"{split}_loss", f"{split}_accuracy")
    if any(c not in r for r in rows for c in columns):
        raise UserError(f"the metrics rows lack one of the columns {', '.join(columns)}; not a table of `mnist train`")
    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train loss")
    ax_loss.plot(epochs, [float(r[f"{split}_loss"]) for r in rows], "s-", label=f"{split} loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [float(r[f"{split}_accuracy"]) for r in rows], "o-", color="tab:green", label=f"{split} accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
    fig.suptitle(title, fontsize=12)
    return fig


def most_confused(cm: torch.Tensor, class_names: Sequence[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first."""
    off = cm.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    n = cm.shape[0]
    return [(class_names[int(i) // n], class_names[int(i) % n], int(c)) for c, i in zip(counts, flat) if c > 0]


def plot_confusion(cm: torch.Tensor, class_names: Sequence[str], title: str = "Confusion matrix (test set)") -> Figure:
    """Counts per (true, predicted) cell, with a side table of the most confused pairs."""
    n = cm.shape[0]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    ax, side = fig.subplots(1, 2, width_ratios=[3, 1.1])
    ax.imshow(cm.numpy(), cmap="Blues", norm=None)
    big = cm.max().item() or 1
    for t in range(n):
        for p in range(n):
            value = int(cm[t, p])
            ax.text(p, t, str(value), ha="center", va="center", fontsize=8 if n <= 10 else 6,
                    color="white" if value > big / 2 else ("black" if value else "#bbbbbb"))
    ax.set_xticks(range(n), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right" if max(map(len, class_names)) > 2 else "center")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    correct = int(cm.diag().sum())
    total = int(cm.sum())
    ax.set_title(f"{title}: {correct}/{total} correct ({100.0 * correct / max(total, 1):.2f}%)", fontsize=11)
    side.set_axis_off()
    pairs = most_confused(cm, class_names)
    lines = ["Most confused", "true → predicted: count", ""] + [f"{t} → {p}: {c}" for t, p, c in pairs]
    side.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=11, family="monospace", transform=side.transAxes)
    return fig


def plot_mistakes(
    images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, confidences: torch.Tensor,
    class_names: Sequence[str], title: str = "Highest-loss test images",
) -> Figure:
    """The given images (already chosen, e.g. by highest loss) with true label, prediction and confidence."""
    titles = [f"true {class_names[int(y)]}\npred {class_names[int(p)]} ({100 * float(c):.0f}%)"
              for y, p, c in zip(labels, preds, confidences)]
    colors = [RIGHT if int(p) == int(y) else WRONG for p, y in zip(preds, labels)]
    return image_grid(images, titles, colors, title, max_cols=6)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically and return the path."""
    path = Path(path)
    fileio.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def run_plots(
    run_dir: str | os.PathLike, model: torch.nn.Module, test_x: torch.Tensor, splits, amp_dtype=None,
    n_show: int = 10, n_mistakes: int = 18, seed: int = 0,
) -> list[Path]:
    """Write samples, predictions, curves, confusion and mistakes PNGs into ``run_dir``; return their paths.

    ``test_x`` is the normalised test set on the model's device; ``splits`` supplies the raw images for display.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"  # read first: a damaged table is refused before any picture is written
    curves = plot_curves(read_metrics(metrics_path)) if metrics_path.exists() else None
    names = splits.info.class_names
    gen = torch.Generator().manual_seed(seed)
    written = []
    pick = torch.randperm(len(splits.train_labels), generator=gen)[:n_show]
    written.append(save_figure(plot_samples(splits.train_images[pick], splits.train_labels[pick], names),
                               run_dir / PICTURES["samples"]))

    logits = predict_logits(model, test_x, 1000, amp_dtype).cpu()
    labels = splits.test_labels
    probs = F.softmax(logits, dim=1)
    confidence, preds = probs.max(dim=1)
    # Show a random handful, but make sure at least a couple of mistakes are among them when any exist.
    shown = torch.randperm(len(labels), generator=gen)[:n_show]
    wrong = (preds != labels).nonzero().flatten()
    if len(wrong) and not (preds[shown] != labels[shown]).any():
        shown[-min(2, len(wrong)):] = wrong[torch.randperm(len(wrong), generator=gen)[:2]][: min(2, len(wrong))]
    written.append(save_figure(plot_predictions(splits.test_images[shown], labels[shown], preds[shown], names),
                               run_dir / PICTURES["predictions"]))
    if curves is not None:
        written.append(save_figure(curves, run_dir / PICTURES["curves"]))
    cm = confusion_matrix(preds, labels, len(names))
    written.append(save_figure(plot_confusion(cm, names), run_dir / PICTURES["confusion"]))
    losses = F.cross_entropy(logits, labels, reduction="none")
    worst = losses.topk(min(n_mistakes, len(losses))).indices
    written.append(save_figure(
        plot_mistakes(splits.test_images[worst], labels[worst], preds[worst], confidence[worst], names),
        run_dir / PICTURES["mistakes"],
    ))
    return written
