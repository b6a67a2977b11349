"""Typed configuration. Every field of a config dataclass is one CLI flag (``batch_size`` -> ``--batch-size``).

The defaults are the guide's: Adam, lr 0.001, batch 64, 5 epochs, normalisation (0.1307, 0.3081).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .data.decode import MAX_PIXELS
from .data.images import PREPROCESSES
from . import fileio
from .errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "onecycle", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
# Images per forward pass when scoring. Not the larger the better on a CPU: a batch's feature maps should
# stay near the caches. The guide's CNN on the 10,000 test images (AMD EPYC, 2 threads): 0.24 s at 256,
# 0.46 s at 1,000, 0.80 s at 10,000 (BENCHMARKS.md).
EVAL_BATCH_SIZE = 256
MAX_RECIPE_BYTES = 65_536  # the packaged recipes are under 1 KB each
RECIPE_ALIASES = {"seed": "guide"}  # the guide's recipe was called "seed" before "seed" meant only --seed


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts: ``low``/``high`` (None = unbounded), each end open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN is in no interval
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        """As an error message says it: "> 0", ">= 1", "in [0, 1)" or "in [0, 4294967295]"."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")


def _number(x: float) -> str:
    """A bound as a user types it: whole numbers in full (4294967295, not 4.29497e+09), others as %g."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Bounds(0, None, low_open=True)
NON_NEGATIVE = Bounds(0, None)
AT_LEAST_ONE = Bounds(1, None)
FRACTION = Bounds(0, 1, high_open=True)  # [0, 1): probabilities, decays, shares
# Seeds as numpy takes them: an epoch's shuffle seeds torch's Generator with seed x 1,000,003 + epoch, which must
# stay below 2**63 (training/epoch.py); a larger --seed was a traceback from torch.manual_seed.
SEEDS = Bounds(0, 2**32 - 1)
# A week: a wait no run needs, and far inside what timedelta and the process group accept (1e308 s overflowed).
DIST_TIMEOUT = Bounds(0, 7 * 24 * 3600, low_open=True)


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, bounds: Bounds | None = None,
         role: str = "train", log: bool = False) -> Any:
    """A dataclass field that declares, once, everything the CLI, validation and sweeps need to know about it.

    ``choices`` / ``bounds``: the values it accepts (checked by ``check_field``). ``role``: "train" for what a
    run computes, "data" for what decides the data set (loaded once per sweep worker, so never swept), "run"
    for where and how a run happens (folders, device, logging; never swept). ``log``: a positive scale better
    searched and plotted on a log axis.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds, "role": role,
                                            "log": log})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, kind: type, value: Any) -> Any:
    """``value`` as the field's type: ints widen to floats; anything else of the wrong type is a UserError."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    kinds = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    raise UserError(f"{flag_name(name)} must be {kinds.get(kind, kind.__name__)}, got {value!r}")


@functools.cache
def _declarations(cls: type) -> dict[str, tuple[type, Any]]:
    """Field name -> (type, metadata) of a config class, read once: ``typing.get_type_hints`` evaluates every
    annotation, and doing that per field made building one TrainConfig cost 32 ms."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


def check_field(cls: type, name: str, value: Any) -> Any:
    """``value`` checked against the declaration of field ``name`` of config class ``cls``; returns it typed.

    The one place a single value is judged: flags, recipes, saved configs and sweep search spaces all come here.
    """
    declared = _declarations(cls)
    if name not in declared:
        raise UserError(f"unknown setting {name!r}; choose one of {', '.join(declared)}")
    kind, meta = declared[name]
    value = _coerce(name, kind, value)
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"unknown {flag_name(name)} {value!r}; choose one of {', '.join(meta['choices'])}")
    if meta.get("bounds") is not None and value not in meta["bounds"]:
        raise UserError(f"{flag_name(name)} must be {meta['bounds']}, got {value}")
    return value


def field_meta(cls: type, name: str) -> dict[str, Any]:
    return dict(_declarations(cls)[name][1])


def _check_all(config: Any) -> None:
    """Every field of a (frozen) config dataclass checked and typed in place."""
    for f in dataclasses.fields(config):
        object.__setattr__(config, f.name, check_field(type(config), f.name, getattr(config, f.name)))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes, saved as ``config.json`` in the run folder.

    Frozen and checked when built (``__post_init__``), from flags, a recipe, a saved run or a sweep's trial
    alike: a TrainConfig that exists is a valid one. Change one with ``dataclasses.replace``.
    """

    dataset: str = _opt("mnist", "data set: mnist, fashion-mnist, kmnist, emnist-digits, emnist-letters, qmnist, "
                        "cifar10, or folder:PATH (your own images, one sub-folder per class)", role="data")
    preprocess: str = _opt("digit", "folder:PATH only: 'digit' prepares each image like an MNIST digit (28x28 grey), "
                           "'resize' squashes it to --image-size (grey or RGB)", PREPROCESSES, role="data")
    image_size: int = _opt(28, "folder:PATH with --preprocess resize: pixels per side", bounds=Bounds(8, 512),
                           role="data")
    test_fraction: float = _opt(0.2, "folder:PATH without train/ and test/ sub-folders: share of each class held out "
                                "for testing (a fixed split, the same for every --seed)",
                                bounds=Bounds(0, 1, True, True), role="data")
    model: str = _opt("guide-cnn", "model name from the registry (see `mnist models`)")
    epochs: int = _opt(5, "full passes over the training set", bounds=AT_LEAST_ONE)
    epoch_fraction: float = _opt(1.0, "share of each epoch to train: its first ceil(F x batches) batches of that "
                                 "epoch's fresh shuffle, so each epoch sees a different subset (1 = a full pass, as "
                                 "the guide; the fast recipe trains 0.7)", bounds=Bounds(0, 1, low_open=True))
    batch_size: int = _opt(64, "images per optimizer step", bounds=AT_LEAST_ONE, log=True)
    lr: float = _opt(0.001, "learning rate (step size per optimizer step)", bounds=POSITIVE, log=True)
    optimizer: str = _opt("adam", "optimizer", OPTIMIZERS)
    momentum: float = _opt(0.9, "momentum for sgd and rmsprop (adam and adamw: --adam-beta1)", bounds=NON_NEGATIVE)
    # torch's Adam(betas=(beta1, beta2)); the defaults are torch's, so the guide's Adam is unchanged. A running mean
    # over ~1/(1 - beta) steps: 10 and 1,000 steps at the defaults, 5 and 100 at the fast recipe's, whose whole run
    # is 165 steps (BENCHMARKS.md)
    adam_beta1: float = _opt(0.9, "adam and adamw: decay of the running mean of the gradients, per step (torch's "
                             "betas[0]; the fast recipe's 0.8 forgets faster, for a short run)", bounds=FRACTION)
    adam_beta2: float = _opt(0.999, "adam and adamw: decay of the running mean of the squared gradients, per step "
                             "(torch's betas[1]; the fast recipe's is 0.99)", bounds=FRACTION)
    weight_decay: float = _opt(0.0, "L2 penalty (decoupled for adamw), per optimizer step", bounds=NON_NEGATIVE)
    schedule: str = _opt("constant", "learning-rate schedule over all steps: constant (the guide's), onecycle "
                         "(warm up from lr/10, then linear to 0) or cosine (warm up from 0, then cosine to 0)", SCHEDULES)
    warmup: float = _opt(0.1, "fraction of all steps spent warming up (onecycle and cosine)", bounds=FRACTION)
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing, 0-1", bounds=FRACTION)
    ema: float = _opt(0.0, "decay of an exponential moving average of the weights, evaluated and saved instead "
                      "of the raw weights (0 = off; e.g. 0.999)", bounds=FRACTION)
    dropout: float = _opt(0.0, "dropout probability before the last layer (the guide's 'add dropout' experiment)",
                          bounds=FRACTION)
    pretrained: bool = _opt(False, "efficientnet-lite0: start from ImageNet weights (the 'pretrained' extra; never "
                            "downloaded at training time) with a new head sized to the data set's classes")
    freeze_backbone: bool = _opt(False, "with --pretrained: train the new head only (fast on a CPU)")
    backbone_lr: float = _opt(0.1, "with --pretrained: learning rate of the pretrained layers as a fraction of --lr "
                              "(discriminative rates, as fastai's)", bounds=Bounds(0, 1, low_open=True), log=True)
    train_bn: bool = _opt(False, "with --pretrained: let batch norm re-estimate its statistics on the new data "
                          "(default: keep ImageNet's, which fine-tuned better on 1,000 MNIST images: 84 %% vs 57 %%)")
    input_size: int = _opt(0, "efficientnet-lite0: pixels per side it resizes its input to, 16-512 "
                           "(0 = 64, which a CPU trains on; ImageNet's own is 224)", bounds=Bounds(0, 512))
    whiten_init: bool = _opt(False, "start the first convolution as a whitening of its input: the principal "
                             "components of its patches in the first 2,000 training images, scaled to unit "
                             "variance, and their negatives (not with --pretrained)")
    stem_fraction: float = _opt(1.0, "share of the run's optimizer steps in which the first convolution (and "
                                "the batch norm after it) trains; from then on it is frozen, so each later step "
                                "skips its backward (1 = it trains all run long, as in the guide; the fast "
                                "recipe freezes it after half its steps)",
                                bounds=Bounds(0, 1))
    stem_depth: int = _opt(1, "with --stem-fraction: how many convolutions, from the input, the frozen stem holds "
                           "(each with the normalisation after it)", bounds=Bounds(1, 64))
    augment: bool = _opt(False, "random affine augmentation on each batch, on the device")
    aug_rotate: float = _opt(10.0, "augmentation: largest rotation, degrees", bounds=Bounds(0, 180))
    aug_translate: float = _opt(0.1, "augmentation: largest shift, fraction of the image side", bounds=FRACTION)
    aug_scale: float = _opt(0.1, "augmentation: largest zoom in or out, fraction", bounds=FRACTION)
    aug_flip: bool = _opt(False, "augmentation: also mirror half the images left-right (photos, not digits)")
    val_size: int = _opt(0, "hold out the last N training images; keep the checkpoint with the best validation "
                         "accuracy and report test accuracy only at the end (0 = test every epoch, as the guide)",
                         bounds=NON_NEGATIVE, role="data")
    # 4,096 images: statistics within about 2 % of the whole set's (a variance from N samples has a relative sd
    # of sqrt(2/N)), at a forward pass costing ~3 % of an MNIST epoch; 10,000 cost the fast recipe 7 %
    precise_bn: int = _opt(4096, "precise batch norm: before each epoch is scored and saved, recompute batch norm's "
                           "running statistics from this many training images (unaugmented, with the weights as "
                           "they are); 0 = off, keeping the running averages of training. Models without batch "
                           "norm skip it", bounds=NON_NEGATIVE)
    seed: int = _opt(0, "seed for weights, shuffling and dropout; the same seed on CPU gives the same run",
                     bounds=SEEDS)
    device: str = _opt("auto", "where to compute: auto picks cuda, then mps, then cpu", DEVICES, role="run")
    precision: str = _opt("auto", "autocast dtype: auto = bf16 where the hardware has native bf16 (AMX or AVX512-BF16 "
                          "CPUs, CUDA), else fp32", PRECISIONS)
    data_dir: str = _opt("data", "folder holding the data sets in torchvision's layout, e.g. <data-dir>/MNIST/raw/ "
                         "(MNIST is fetched there when missing)", role="data")
    out: str = _opt("", "run folder to write (default: runs/<timestamp>)", role="run")
    overwrite: bool = _opt(False, "replace the run already in --out (its checkpoints, metrics, pictures and "
                           "TensorBoard events are deleted first)", role="run")
    train_subset: int = _opt(0, "train on only the first N training images (0 = all 60,000); for smoke runs",
                             bounds=NON_NEGATIVE, role="data")
    test_subset: int = _opt(0, "score only the first N test images (0 = all 10,000 of MNIST); for smoke runs of a "
                            "slow model: every test figure is then of those N", bounds=NON_NEGATIVE, role="data")
    eval_batch_size: int = _opt(EVAL_BATCH_SIZE, "images per forward pass when evaluating (256: the feature "
                                "maps stay near the CPU's caches; faster than 1,000)",
                                bounds=AT_LEAST_ONE, role="run")
    log_every: int = _opt(100, "print the training loss every N batches when the output is not a terminal",
                          bounds=AT_LEAST_ONE, role="run")
    plots: bool = _opt(False, "write the PNG pictures into the run folder at the end of training", role="run")
    tensorboard: bool = _opt(True, "write TensorBoard event files into the run folder (`tensorboard --logdir runs` "
                             "compares runs)", role="run")
    threads: int = _opt(0, "torch compute threads (intra-op); 0 = automatic: the cores that other work leaves free, "
                        "read at start-up and every 0.5 s while training (OMP_NUM_THREADS, when set, decides instead)",
                        bounds=Bounds(0, 1024), role="run")
    dist_timeout: float = _opt(300.0, "under torchrun: seconds a process waits for the others before giving up",
                               bounds=DIST_TIMEOUT, role="run")
    compile: bool = _opt(False, "torch.compile the model for training (checkpoints keep the plain module's weights)")
    cuda_graphs: bool = _opt(False, "capture the training step once as a CUDA graph and replay it: one launch instead of "
                             "~100 per step for small models (CUDA; elsewhere the same fixed-buffer step runs uncaptured)")
    recipe: str = _opt("", "named preset from recipes/ (guide, fast, best) or a JSON file; flags you give override it",
                       role="run")

    def __post_init__(self) -> None:
        _check_all(self)
        # Rules between fields; each field's own type, choices and bounds are declared above.
        if self.input_size and self.input_size < 16:
            raise UserError(f"--input-size must be 0 (the model's default) or 16-512 pixels, got {self.input_size}")
        if self.cuda_graphs and (self.augment or self.compile):
            raise UserError("--cuda-graphs cannot be combined with --augment or --compile")
        if self.train_bn and not self.pretrained:
            raise UserError("--train-bn is a choice for --pretrained networks; without it batch norm always trains")
        if self.freeze_backbone and not self.pretrained:
            raise UserError("--freeze-backbone needs --pretrained: a frozen random backbone learns nothing")
        if self.stem_depth != 1 and self.stem_fraction == 1:
            raise UserError("--stem-depth needs --stem-fraction below 1: a stem that never freezes has no depth")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The config a recipe describes (``recipes/<name>.json`` in the package, or a JSON file), with
        ``overrides`` (field=value) laid over it; checked once, as built."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = read_recipe(name)
        unknown = sorted((set(values) - {"description"} | set(overrides)) - names)
        if unknown:
            raise UserError(f"recipe {name!r} sets unknown fields: {', '.join(unknown)}")
        values.pop("description", None)
        return cls(**{**values, "recipe": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from a saved dict, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def read_recipe(name: str) -> dict[str, Any]:
    """The settings of recipe ``name``: a packaged one (``recipes/<name>.json``) or a JSON file of settings.

    A file is read only up to ``MAX_RECIPE_BYTES``: ``--recipe /dev/zero`` must not fill the memory."""
    packaged = resources.files("mnist_classifier").joinpath(f"recipes/{RECIPE_ALIASES.get(name, name)}.json")
    if packaged.is_file():
        values = json.loads(packaged.read_bytes())
    elif Path(name).exists():
        values = fileio.read_json(name, limit=MAX_RECIPE_BYTES)
    else:
        known = sorted(p.name.removesuffix(".json") for p in resources.files("mnist_classifier").joinpath("recipes").iterdir()
                       if p.name.endswith(".json"))
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(known)} or a JSON file")
    if not isinstance(values, dict):
        raise UserError(f"recipe {name} must be a JSON object of settings, e.g. {{\"epochs\": 5, \"lr\": 0.001}}")
    return values


def parse_value(cls: type, name: str, text: str) -> Any:
    """One field's value from text (a flag, ``KEY=VALUE``, a sweep's grid), typed and checked by its declaration."""
    if name not in _declarations(cls):
        check_field(cls, name, None)  # raises: unknown setting
    kind = _declarations(cls)[name][0]
    if kind is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise UserError(f"{flag_name(name)}: {text!r} is not true or false")
        return check_field(cls, name, text.lower() in ("1", "true", "yes"))
    try:
        return check_field(cls, name, kind(text))
    except ValueError:
        raise UserError(f"{flag_name(name)}: {text!r} is not a valid {kind.__name__}") from None


def parse_overrides(cls: type, spec: str) -> dict[str, Any]:
    """``"batch_size=512,lr=0.04"`` -> ``{"batch_size": 512, "lr": 0.04}``, typed by ``cls``'s fields as the flags are."""
    out: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{item!r}: expected KEY=VALUE")
        out[key] = parse_value(cls, key, value)
    return out


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
                flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"), help=help_text,
            )


def config_from_args(args: argparse.Namespace, cls: type, base: Any | None = None) -> Any:
    """The config the user asked for: ``base`` (or the defaults) with the flags they typed laid over it."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return dataclasses.replace(base if base is not None else cls(), **given)


@dataclass(frozen=True)
class ServeConfig:
    """``mnist serve`` settings; one flag per field, checked when built as TrainConfig is."""

    checkpoint: str = _opt("", "model.pt to serve (default: the newest run's)")
    host: str = _opt("127.0.0.1", "address to listen on; loopback unless you mean to expose it")
    port: int = _opt(8000, "TCP port", bounds=Bounds(0, 65535))
    device: str = _opt("auto", "where to compute", DEVICES)
    max_body_bytes: int = _opt(5_000_000, "largest request body accepted, in bytes (larger: 413)", bounds=AT_LEAST_ONE)
    max_pixels: int = _opt(MAX_PIXELS, "largest image accepted, in pixels (width x height)", bounds=AT_LEAST_ONE)
    max_decodes: int = _opt(0, "large images decoded at once per worker (others wait their turn); 0 = the worker's "
                               "share of the CPU cores", bounds=Bounds(0, 1024))
    workers: int = _opt(0, "worker processes, each with the model loaded once; 0 = one per CPU core (at most 8) on "
                           "a CPU, 1 on a GPU", bounds=Bounds(0, 1024))
    threads: int = _opt(0, "compute threads per worker (torch or onnxruntime); 0 = the CPU cores shared out among "
                           "the workers", bounds=Bounds(0, 1024))
    backend: str = _opt("auto", "what runs the network: torch, or onnxruntime on the model's ONNX export; auto = "
                                "onnxruntime on a CPU where it is installed, else torch", ("auto", "torch", "onnxruntime"))
    export_cache: str = _opt("", "folder keeping each checkpoint's ONNX export (onnxruntime backend) for the next "
                                 "start, which then skips the export's ~8 s; '' = $XDG_CACHE_HOME/mnist-classifier/onnx "
                                 "(~/.cache/...), 'off' = export at every start")
    max_batch: int = _opt(16, "most images in one forward pass (dynamic batching)", bounds=Bounds(1, 1024))
    max_wait_ms: float = _opt(2.0, "longest an image waits for others to share its forward pass, in ms (0: only "
                                   "requests read in the same turn of the event loop share one)", bounds=Bounds(0, 1000))
    max_batch_files: int = _opt(64, "most images in one POST /predict/batch", bounds=Bounds(1, 1024))
    access_log: float = _opt(0.0, "share of requests written to stderr as JSON lines (request id, status, ms): "
                                  "0 = none, 1 = all", bounds=Bounds(0, 1))
    drain_timeout: float = _opt(5.0, "seconds SIGTERM waits for requests in flight before the workers stop",
                                bounds=Bounds(0, 3600, low_open=True))
    allowed_hosts: str = _opt("", "other Host names the server answers to, comma-separated (the listening address, "
                              "localhost, 127.0.0.1 and ::1 always are): a guard against DNS rebinding")
    allowed_origins: str = _opt("", "web origins allowed to POST from a browser, comma-separated, e.g. "
                                "https://example.org (pages served by this server always are)")
    header_timeout: float = _opt(10.0, "seconds a client may take to send its request headers before it is dropped",
                                 bounds=POSITIVE)
    keep_alive: float = _opt(5.0, "seconds an idle keep-alive connection stays open", bounds=POSITIVE)
    body_timeout: float = _opt(60.0, "seconds a client may take to send a request body (longer: 408)",
                               bounds=POSITIVE)
    body_min_rate: int = _opt(1000, "bytes/s a request body must arrive at, over each 5 s (slower: 408); 0 = any",
                              bounds=NON_NEGATIVE)
    max_connections: int = _opt(256, "open connections per worker (beyond: 503); with --max-body-bytes it bounds the "
                                     "memory bodies may hold", bounds=AT_LEAST_ONE)
    max_url_bytes: int = _opt(8192, "longest request line, in bytes (longer: 414)", bounds=Bounds(64, None))
    max_header_bytes: int = _opt(65536, "largest request header block, in bytes (larger: 431)", bounds=Bounds(256, None))
    max_headers: int = _opt(100, "most request header lines (more: 431)", bounds=AT_LEAST_ONE)
    max_queue: int = _opt(256, "most images waiting for the model per worker, announced or decoded (beyond: 503 with "
                               "Retry-After)", bounds=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        _check_all(self)
