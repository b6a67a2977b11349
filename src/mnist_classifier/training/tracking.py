"""TensorBoard event files in every run folder, so that ``tensorboard --logdir runs`` (or a sweep's folder)
lays all runs side by side: the training loss per logging interval, the epoch metrics, the run's settings
with its final metrics (the HPARAMS tab), and the confusion matrix of the model kept.

Tags follow Lightning's and Keras's habit: ``train/loss``, ``val/accuracy`` or ``test/accuracy``, ``lr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig
from ..runs import EVENTS

# Settings shown in the HPARAMS tab: the ones a comparison of runs is about.
HPARAMS = ("model", "optimizer", "lr", "batch_size", "epochs", "epoch_fraction", "stem_fraction", "schedule", "dropout",
           "weight_decay", "momentum", "adam_beta1", "adam_beta2", "label_smoothing", "ema", "augment", "seed",
           "precision", "val_size", "train_subset", "dataset")
CELL_PX = 24  # each confusion-matrix cell as a 24x24 pixel square
# The HPARAMS tab's events file ends so, to be found and replaced: the tab shows the settings of the first session
# it reads in a folder beside the metrics of the last, so a run resumed with more --epochs keeps one file, not two.
HPARAMS_SUFFIX = ".hparams"


def confusion_image(matrix: torch.Tensor) -> torch.Tensor:
    """A ``(3, C*24, C*24)`` float image of a ``(C, C)`` count matrix: each row normalised by its true-class
    count, white (0 %) to dark blue (100 %) on a square root scale so that single mistakes show."""
    rows = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    shade = rows.sqrt().float()  # (C, C) in [0, 1]
    cells = shade.repeat_interleave(CELL_PX, 0).repeat_interleave(CELL_PX, 1)
    blue = torch.tensor([0.03, 0.19, 0.42]).view(3, 1, 1)  # matplotlib's Blues at its darkest
    return 1.0 - cells.unsqueeze(0) * (1.0 - blue)


def session_end(status: int) -> Any:
    """The HPARAMS tab's end-of-session summary with ``status`` (torch's ``hparams`` always writes success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status),
                                             version=metadata.PLUGIN_DATA_VERSION)
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                        metadata=metadata.create_summary_metadata(data))])


class TensorBoardLog:
    """Writes one run's events; ``fit`` feeds it beside the caller's Reporter. Opened lazily, closed by ``close``."""

    def __init__(self, run_dir: Path, n_batches: int, split: str, resumed_at: tuple[int, int] | None = None,
                 lr: Callable[[], float] | None = None) -> None:
        """``split``: the one each epoch scores ("val" or "test", the run spec's). ``resumed_at``: a resumed run's
        first (epoch, batch), as ``step`` receives them; None for a new run. ``lr``: the learning rate of the step
        just taken, logged with its loss as ``train/lr``, so that a schedule's warm-up and decay show within an
        epoch (a one-epoch one-cycle run has one epoch row)."""
        from torch.utils.tensorboard import SummaryWriter  # tensorboard costs ~0.3 s to import; only runs that log

        self.n_batches, self.split, self.run_dir, self.lr = n_batches, split, run_dir, lr
        # A resumed run adds an events file beside the first. A process killed mid-epoch had logged losses past
        # its last checkpoint, which the resumed run logs again: purge_step tells TensorBoard to hide every older
        # event from that step on, so the curve does not run back over itself. The epoch metrics sit on the epoch
        # axis (1, 2, ...), below that step, and are logged only after their epoch's checkpoint, so none is stale.
        purge = self.global_step(*resumed_at) if resumed_at else None
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge)

    def global_step(self, epoch: int, batch: int) -> int:
        """``train/loss``'s axis: the run's batches counted from 1 (``epoch`` from 1, ``batch`` from 0)."""
        return (epoch - 1) * self.n_batches + batch + 1

    def step(self, epoch: int, batch: int, loss: float | None) -> None:
        if loss is not None:
            step = self.global_step(epoch, batch)
            self.writer.add_scalar("train/loss", loss, step)
            if self.lr is not None:
                self.writer.add_scalar("train/lr", self.lr(), step)

    def epoch(self, row: dict[str, Any]) -> None:
        step, split = row["epoch"], self.split
        self.writer.add_scalar("train/epoch_loss", row["train_loss"], step)
        self.writer.add_scalar(f"{split}/accuracy", row[f"{split}_accuracy"], step)
        self.writer.add_scalar(f"{split}/loss", row[f"{split}_loss"], step)
        self.writer.add_scalar("lr", row["lr"], step)
        self.writer.add_scalar("time/epoch_seconds", row["seconds"], step)

    def finish(self, cfg: TrainConfig, summary: dict[str, Any], confusion: torch.Tensor | None) -> None:
        metrics = {"hparam/test_accuracy": summary["test_accuracy"], "hparam/test_loss": summary["test_loss"],
                   "hparam/train_seconds": summary["train_seconds"]}
        if "val_accuracy" in summary:
            metrics["hparam/val_accuracy"] = summary["val_accuracy"]
        self._replace_hparams(cfg, metrics, finished=True)
        if confusion is not None:
            self.writer.add_image("test/confusion_matrix", confusion_image(confusion), cfg.epochs)

    def unfinished(self, cfg: TrainConfig, row: dict[str, Any] | None) -> None:
        """A run that stopped before its end (a sweep's pruned or diverged trial, Ctrl-C, an error): its HPARAMS
        row says Failure beside its last epoch's accuracy (``row``; None before the first), so that a sweep's
        pruned points show beside the rest, and a resumed run that finishes replaces it."""
        accuracy = f"{self.split}_accuracy"
        self._replace_hparams(cfg, {f"hparam/{accuracy}": row[accuracy]} if row else {}, finished=False)

    def _replace_hparams(self, cfg: TrainConfig, metrics: dict[str, float], finished: bool) -> None:
        """What ``SummaryWriter.add_hparams`` writes (with the session's end status), into this run's folder, in a
        new file that then replaces any earlier one (written first: a kill in between leaves the old file beside
        the new, never neither)."""
        from tensorboard.plugins.hparams import api_pb2
        from torch.utils.tensorboard.summary import hparams as hparams_summaries, scalar
        from torch.utils.tensorboard.writer import FileWriter

        experiment, start, end = hparams_summaries({k: getattr(cfg, k) for k in HPARAMS}, metrics)
        if not finished:
            end = session_end(api_pb2.STATUS_FAILURE)
        old = sorted(self.run_dir.glob(EVENTS + HPARAMS_SUFFIX))
        writer = FileWriter(str(self.run_dir), filename_suffix=HPARAMS_SUFFIX)
        for summary in (experiment, start, end, *(scalar(k, v) for k, v in metrics.items())):
            writer.add_summary(summary)
        writer.close()
        for path in old:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.writer.close()


class WithLog:
    """A Reporter that also logs to TensorBoard (the log first: a reporter that stops the run, as a sweep's
    pruning does, still leaves the epoch logged)."""

    def __init__(self, reporter: Any, log: TensorBoardLog) -> None:
        self.reporter, self.log = reporter, log

    def start(self, info: dict[str, Any]) -> None:
        self.reporter.start(info)

    def step(self, epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        self.log.step(epoch, batch, loss)
        self.reporter.step(epoch, batch, n_batches, loss)

    def epoch(self, row: dict[str, Any]) -> None:
        self.log.epoch(row)
        self.reporter.epoch(row)
