"""Typed configuration. Every field of a config dataclass is one CLI flag (``batch_size`` -> ``--batch-size``).

The defaults are the guide's: Adam, lr 0.001, batch 64, 5 epochs, normalisation (0.1307, 0.3081).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

MAX_PIXELS = 16_000_000  # largest image accepted anywhere: a 16-megapixel photo (a bomb can declare 10^10 in a few bytes)
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "onecycle", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
PREPROCESSES = ("digit", "resize")
RECIPE_ALIASES = {"seed": "guide"}  # the guide's recipe was called "seed" before "seed" meant only --seed


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field whose metadata carries its CLI help text (and choices)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes, saved as ``config.json`` in the run folder."""

    dataset: str = _opt("mnist", "data set: mnist, fashion-mnist, kmnist, emnist-digits, emnist-letters, qmnist, "
                        "cifar10, or folder:PATH (your own images, one sub-folder per class)")
    preprocess: str = _opt("digit", "folder:PATH only: 'digit' prepares each image like an MNIST digit (28x28 grey), "
                           "'resize' squashes it to --image-size (grey or RGB)", PREPROCESSES)
    image_size: int = _opt(28, "folder:PATH with --preprocess resize: pixels per side")
    test_fraction: float = _opt(0.2, "folder:PATH without train/ and test/ sub-folders: share of each class held out "
                                "for testing (a fixed split, the same for every --seed)")
    model: str = _opt("guide-cnn", "model name from the registry (see `mnist models`)")
    epochs: int = _opt(5, "full passes over the training set")
    batch_size: int = _opt(64, "images per optimizer step")
    lr: float = _opt(0.001, "learning rate (step size per optimizer step)")
    optimizer: str = _opt("adam", "optimizer", OPTIMIZERS)
    momentum: float = _opt(0.9, "momentum for sgd and rmsprop (unused by adam)")
    weight_decay: float = _opt(0.0, "L2 penalty (decoupled for adamw), per optimizer step")
    schedule: str = _opt("constant", "learning-rate schedule over all steps: constant (the guide's), onecycle "
                         "(warm up from lr/10, then linear to 0) or cosine (warm up from 0, then cosine to 0)", SCHEDULES)
    warmup: float = _opt(0.1, "fraction of all steps spent warming up (onecycle and cosine)")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing, 0-1")
    ema: float = _opt(0.0, "decay of an exponential moving average of the weights, evaluated and saved instead "
                      "of the raw weights (0 = off; e.g. 0.999)")
    dropout: float = _opt(0.0, "dropout probability before the last layer (the guide's 'add dropout' experiment)")
    pretrained: bool = _opt(False, "efficientnet-lite0: start from ImageNet weights (the 'pretrained' extra; never "
                            "downloaded at training time) with a new head sized to the data set's classes")
    freeze_backbone: bool = _opt(False, "with --pretrained: train the new head only (fast on a CPU)")
    backbone_lr: float = _opt(0.1, "with --pretrained: learning rate of the pretrained layers as a fraction of --lr "
                              "(discriminative rates, as fastai's)")
    train_bn: bool = _opt(False, "with --pretrained: let batch norm re-estimate its statistics on the new data "
                          "(default: keep ImageNet's, which fine-tuned better on 1,000 MNIST images: 84 %% vs 57 %%)")
    input_size: int = _opt(0, "efficientnet-lite0: pixels per side it resizes its input to, 16-512 "
                           "(0 = 64, which a CPU trains on; ImageNet's own is 224)")
    augment: bool = _opt(False, "random affine augmentation on each batch, on the device")
    aug_rotate: float = _opt(10.0, "augmentation: largest rotation, degrees")
    aug_translate: float = _opt(0.1, "augmentation: largest shift, fraction of the image side")
    aug_scale: float = _opt(0.1, "augmentation: largest zoom in or out, fraction")
    aug_flip: bool = _opt(False, "augmentation: also mirror half the images left-right (photos, not digits)")
    val_size: int = _opt(0, "hold out the last N training images; keep the checkpoint with the best validation "
                         "accuracy and report test accuracy only at the end (0 = test every epoch, as the guide)")
    # 4,096 images: statistics within about 2 % of the whole set's (a variance from N samples has a relative sd
    # of sqrt(2/N)), at a forward pass costing ~3 % of an MNIST epoch; 10,000 cost the fast recipe 7 %
    precise_bn: int = _opt(4096, "precise batch norm: before each epoch is scored and saved, recompute batch norm's "
                           "running statistics from this many training images (unaugmented, with the weights as "
                           "they are); 0 = off, keeping the running averages of training. Models without batch "
                           "norm skip it")
    seed: int = _opt(0, "seed for weights, shuffling and dropout; the same seed on CPU gives the same run")
    device: str = _opt("auto", "where to compute: auto picks cuda, then mps, then cpu", DEVICES)
    precision: str = _opt("auto", "autocast dtype: auto = bf16 where the hardware has native bf16 (AMX CPUs, CUDA), else fp32", PRECISIONS)
    data_dir: str = _opt("data", "folder holding the data sets in torchvision's layout, e.g. <data-dir>/MNIST/raw/ "
                         "(MNIST is fetched there when missing)")
    out: str = _opt("", "run folder to write (default: runs/<timestamp>)")
    overwrite: bool = _opt(False, "replace the run already in --out (its checkpoints are deleted first)")
    train_subset: int = _opt(0, "train on only the first N training images (0 = all 60,000); for smoke runs")
    eval_batch_size: int = _opt(1000, "images per forward pass when evaluating (no gradients, so larger is fine)")
    log_every: int = _opt(100, "print the training loss every N batches when the output is not a terminal")
    plots: bool = _opt(False, "write the PNG pictures into the run folder at the end of training")
    dist_timeout: float = _opt(300.0, "under torchrun: seconds a process waits for the others before giving up")
    compile: bool = _opt(False, "torch.compile the model for training (checkpoints keep the plain module's weights)")
    cuda_graphs: bool = _opt(False, "capture the training step once as a CUDA graph and replay it: one launch instead of "
                             "~100 per step for small models (CUDA; elsewhere the same fixed-buffer step runs uncaptured)")
    recipe: str = _opt("", "named preset from recipes/ (guide, fast, best) or a JSON file; flags you give override it")

    def validate(self) -> "TrainConfig":
        """Raise UserError for values that cannot train; return self so calls can chain.

        The data set and model names are checked against their registries by ``training.check_config``.
        """
        if self.preprocess not in PREPROCESSES:
            raise UserError(f"unknown --preprocess {self.preprocess!r}; choose {' or '.join(PREPROCESSES)}")
        if not 8 <= self.image_size <= 512:
            raise UserError(f"--image-size must be 8-512 pixels, got {self.image_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be between 0 and 1, got {self.test_fraction}")

        if self.epochs <= 0:
            raise UserError(f"--epochs must be a positive whole number, got {self.epochs}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be a positive whole number, got {self.batch_size}")
        if not self.lr > 0:  # also rejects NaN
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("warmup", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"--ema must be 0 (off) or a decay in (0, 1), got {self.ema}")
        if self.weight_decay < 0 or self.momentum < 0:
            raise UserError("--weight-decay and --momentum must not be negative")
        if min(self.aug_rotate, self.aug_translate, self.aug_scale) < 0 or self.aug_scale >= 1:
            raise UserError("--aug-rotate and --aug-translate must be >= 0 and --aug-scale in [0, 1)")
        if not self.dist_timeout > 0:
            raise UserError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        if self.precise_bn < 0:
            raise UserError(f"--precise-bn must be 0 (off) or a number of images, got {self.precise_bn}")
        if self.val_size < 0:
            raise UserError(f"--val-size must be 0 or positive, got {self.val_size}")
        if self.train_subset < 0:
            raise UserError(f"--train-subset must be 0 (all) or positive, got {self.train_subset}")
        if self.eval_batch_size <= 0:
            raise UserError(f"--eval-batch-size must be positive, got {self.eval_batch_size}")
        if self.cuda_graphs and (self.augment or self.compile):
            raise UserError("--cuda-graphs cannot be combined with --augment or --compile")
        if self.log_every <= 0:
            raise UserError(f"--log-every must be positive, got {self.log_every}")
        if self.input_size and not 16 <= self.input_size <= 512:
            raise UserError(f"--input-size must be 0 (the model's default) or 16-512 pixels, got {self.input_size}")
        if self.train_bn and not self.pretrained:
            raise UserError("--train-bn is a choice for --pretrained networks; without it batch norm always trains")
        if self.freeze_backbone and not self.pretrained:
            raise UserError("--freeze-backbone needs --pretrained: a frozen random backbone learns nothing")
        if not 0.0 < self.backbone_lr <= 1.0:
            raise UserError(f"--backbone-lr must be a fraction in (0, 1] of --lr, got {self.backbone_lr}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_recipe(cls, name: str) -> "TrainConfig":
        """The config a recipe file describes (``recipes/<name>.json`` in the package, or a path)."""
        names = {f.name for f in dataclasses.fields(cls)}
        packaged = resources.files("mnist_classifier").joinpath(f"recipes/{RECIPE_ALIASES.get(name, name)}.json")
        path = Path(name)
        try:
            text = packaged.read_text() if packaged.is_file() else path.read_text()
            values = json.loads(text)
        except (OSError, ValueError) as exc:
            known = sorted(p.name.removesuffix(".json") for p in resources.files("mnist_classifier").joinpath("recipes").iterdir()
                           if p.name.endswith(".json"))
            raise UserError(f"unknown recipe {name!r} ({exc.__class__.__name__}); choose one of {', '.join(known)} or a JSON file") from None
        unknown = sorted(set(values) - names - {"description"})
        if unknown:
            raise UserError(f"recipe {name!r} sets unknown fields: {', '.join(unknown)}")
        values.pop("description", None)
        return cls(**{**values, "recipe": name})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from a saved dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_overrides(cls: type, spec: str) -> dict[str, Any]:
    """``"batch_size=512,lr=0.04"`` -> ``{"batch_size": 512, "lr": 0.04}``, typed by ``cls``'s fields as the flags are."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise UserError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(hints)}")
        kind = hints[key]
        try:
            out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"{key}={value!r}: not a valid {kind.__name__}") from None
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field. Defaults are SUPPRESSed so that only flags the user typed
    appear in the namespace; ``config_from_args`` lays them over a base config (defaults or a resumed run)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )
        else:
            parser.add_argument(
                _flag(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"), help=help_text,
            )


def config_from_args(args: argparse.Namespace, cls: type, base: Any | None = None) -> Any:
    """The config the user asked for: ``base`` (or the defaults) with the flags they typed laid over it."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return dataclasses.replace(base if base is not None else cls(), **given)


@dataclass
class ServeConfig:
    """``mnist serve`` settings; one flag per field."""

    checkpoint: str = _opt("", "model.pt to serve (default: the newest run's)")
    host: str = _opt("127.0.0.1", "address to listen on; loopback unless you mean to expose it")
    port: int = _opt(8000, "TCP port")
    device: str = _opt("auto", "where to compute", DEVICES)
    max_body_bytes: int = _opt(5_000_000, "largest request body accepted, in bytes (larger: 413)")
    max_pixels: int = _opt(MAX_PIXELS, "largest image accepted, in pixels (width x height)")
    max_decodes: int = _opt(0, "large images decoded at once per worker (others wait their turn); 0 = the worker's "
                               "share of the CPU cores")
    workers: int = _opt(0, "worker processes, each with the model loaded once; 0 = one per CPU core (at most 8) on "
                           "a CPU, 1 on a GPU")
    threads: int = _opt(0, "compute threads per worker (torch or onnxruntime); 0 = the CPU cores shared out among "
                           "the workers")
    backend: str = _opt("auto", "what runs the network: torch, or onnxruntime on the model's ONNX export; auto = "
                                "onnxruntime on a CPU where it is installed, else torch", ("auto", "torch", "onnxruntime"))
    max_batch: int = _opt(16, "most images in one forward pass (dynamic batching)")
    max_wait_ms: float = _opt(2.0, "longest an image waits for others to share its forward pass, in ms (0: only "
                                   "requests read in the same turn of the event loop share one)")
    max_batch_files: int = _opt(64, "most images in one POST /predict/batch")
    access_log: float = _opt(0.0, "share of requests written to stderr as JSON lines (request id, status, ms): "
                                  "0 = none, 1 = all")
    drain_timeout: float = _opt(5.0, "seconds SIGTERM waits for requests in flight before the workers stop")
    allowed_hosts: str = _opt("", "other Host names the server answers to, comma-separated (the listening address, "
                              "localhost, 127.0.0.1 and ::1 always are): a guard against DNS rebinding")
    allowed_origins: str = _opt("", "web origins allowed to POST from a browser, comma-separated, e.g. "
                                "https://example.org (pages served by this server always are)")
    header_timeout: float = _opt(10.0, "seconds a client may take to send its request headers before it is dropped")
    keep_alive: float = _opt(5.0, "seconds an idle keep-alive connection stays open")

    def validate(self) -> "ServeConfig":
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be 0-65535, got {self.port}")
        if self.max_body_bytes <= 0 or self.max_pixels <= 0:
            raise UserError("--max-body-bytes and --max-pixels must be positive")
        for flag, value in (("--max-decodes", self.max_decodes), ("--workers", self.workers), ("--threads", self.threads)):
            if not 0 <= value <= 1024:
                raise UserError(f"{flag} must be 0 (automatic) or a positive count up to 1024, got {value}")
        if not (1 <= self.max_batch <= 1024 and 1 <= self.max_batch_files <= 1024):
            raise UserError("--max-batch and --max-batch-files must be 1-1024")
        if not (0 <= self.max_wait_ms <= 1000 and 0 <= self.access_log <= 1 and 0 < self.drain_timeout <= 3600):
            raise UserError("--max-wait-ms must be 0-1000, --access-log 0-1 and --drain-timeout positive (seconds)")
        if not (self.header_timeout > 0 and self.keep_alive > 0):
            raise UserError("--header-timeout and --keep-alive must be positive")
        return self
