"""Training: the whole data set on the device, batches sliced from one permutation per epoch.

``fit`` runs the seed guide's loop (forward, cross-entropy, backward, step; test after each epoch) and writes
the run folder; with ``val_size`` it selects on a held-out validation split instead and tests once at the
end. It never prints: progress goes to a ``Reporter`` the caller supplies.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, fileio, runs
from .augment import AffineAugment
from .config import TrainConfig
from .data import DatasetInfo, Splits
from .device import autocast_dtype, flush_denormals, preferred_memory_format
from .distributed import SINGLE, DistContext, check_batch, same_on_all_ranks
from .errors import DivergedError, Interrupted, UserError
from .evaluate import evaluate
from .graphs import StaticStep, lr_value
from .model import ModelConfig, build_model, count_parameters
from .preprocess import model_input


class Reporter:
    """Receives progress from ``fit``. The default ignores everything; the CLI prints."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, epoch: int, batch: int, n_batches: int, loss: float | None) -> None:
        """Called after every optimizer step; ``loss`` (mean since the last report) only every ``log_every`` batches."""

    def epoch(self, row: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """What ``last.pt`` restores: where we are and the history so far."""

    epoch: int = 0  # epochs completed
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv so far
    train_seconds: float = 0.0  # time in the training loop only, summed over epochs
    best_val: float = -1.0  # best validation accuracy so far (with val_size)
    best_epoch: int = 0


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernels update every parameter in one call instead of a dozen small ops per tensor;
    # same arithmetic as the default path (CPU and CUDA have them, MPS partly).
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if cfg.cuda_graphs and device.type == "cuda":
        fused["capturable"] = True  # step counts on the device, so a captured step can advance them
    wd = cfg.weight_decay
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.momentum > 0, **fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, foreach=True,
                                   capturable=bool(fused.get("capturable")))
    raise UserError(f"unknown optimizer {cfg.optimizer!r}")


def learning_rate(step: int, total_steps: int, base: float, schedule: str, warmup: float) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``. A pure function of its inputs."""
    if schedule == "constant":
        return base
    warm = int(warmup * total_steps)
    if step < warm:
        start = base / 10 if schedule == "onecycle" else 0.0
        return start + (base - start) * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)  # 0 -> 1 over the rest of training
    if schedule == "onecycle":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


class EMA:
    """An exponential moving average of a model's weights (and a copy of its buffers, e.g. batch-norm stats).

    Averaging the last few hundred steps' weights smooths out the noise of the final steps; the average is
    what gets evaluated and saved. The decay ramps up from 0 so early, random weights are forgotten fast.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.updates = 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # One multi-tensor kernel per list instead of one small kernel per tensor (launch-bound on a GPU).
        mine, theirs = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(mine, theirs, 1.0 - d)
        buffers = list(self.model.buffers())  # batch-norm statistics; a model may have none
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))


@dataclass
class StepExtras:
    """Optional parts of a training step beyond the guide's: schedule, smoothing, augmentation, EMA."""

    label_smoothing: float = 0.0
    lr_at: Callable[[int], float] | None = None  # global step -> learning rate
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # (B, C, H, W) -> (B, C, H, W)
    ema: EMA | None = None
    first_step: int = 0  # global step number of this epoch's first batch
    start_batch: int = 0  # resume inside an epoch: skip the batches already trained
    carried: tuple[float, int] = (0.0, 0)  # (summed loss, images) of those skipped batches
    stop_requested: Callable[[], bool] | None = None  # checked after every complete step (Ctrl-C)
    static: StaticStep | None = None  # --cuda-graphs: the step on fixed buffers (replaces the plain step below)


class StopRequested(Exception):
    """Training stopped cleanly after a complete step, at the user's request (Ctrl-C)."""

    def __init__(self, batches_done: int, loss_sum: float, seen: int) -> None:
        super().__init__(f"stopped after {batches_done} batches")
        self.batches_done, self.loss_sum, self.seen = batches_done, loss_sum, seen


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    perm: torch.Tensor,
    batch_size: int,
    epoch: int = 1,
    amp_dtype: torch.dtype | None = None,
    log_every: int = 100,
    on_step: Callable[[int, int, int, float | None], None] | None = None,
    extras: StepExtras | None = None,
    n_batches: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> float:
    """One pass over ``train_x`` (N, C, H, W) in the order ``perm`` (N,); returns the mean training loss.

    Each batch is a slice of the permutation: forward, cross-entropy, backward, optimizer step. ``on_step``
    gets (epoch, batch index, batches, loss) after every step, with the mean loss since the last report every
    ``log_every`` batches (and on the last) and None otherwise, so the loss is only read back that often.
    ``shard`` = (rank, world size): this process trains on every world-size-th image of each batch.
    """
    extras = extras or StepExtras()
    model.train()
    rank, world = shard
    if n_batches is None:
        n_batches = (len(perm) + batch_size - 1) // batch_size  # the last, smaller batch is kept, as DataLoader does
    seen = extras.carried[1]
    running = torch.zeros((), device=train_x.device)  # summed loss since the last report, kept on device
    total = torch.full((), extras.carried[0], device=train_x.device)  # summed per-example loss over the epoch
    since = 0
    for b in range(extras.start_batch, n_batches):
        idx = perm[b * batch_size : (b + 1) * batch_size][rank::world]
        n = len(idx)
        seen += n
        lr = extras.lr_at(extras.first_step + b) if extras.lr_at is not None else None
        if extras.static is not None:
            detached = extras.static.step(idx, lr)
        else:
            x, y = train_x[idx], train_y[idx]  # (B, C, H, W) float, (B,) int64
            if extras.augment is not None:
                x = extras.augment(x)
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x), y, label_smoothing=extras.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            detached = loss.detach()
        if extras.ema is not None:
            extras.ema.update(model)
        running += detached
        total += detached * n
        since += 1
        report = b % log_every == 0 or b == n_batches - 1
        mean_loss = (running / since).item() if report else None
        if report:
            if not math.isfinite(mean_loss):
                raise DivergedError(
                    f"loss became {mean_loss} at epoch {epoch}, batch {b}; lower the learning rate "
                    f"(the guide's advice for a NaN loss, e.g. divide --lr by 10)"
                )
            running.zero_()
            since = 0
        if on_step is not None:
            on_step(epoch, b, n_batches, mean_loss)
        if extras.stop_requested is not None and extras.stop_requested() and b < n_batches - 1:
            raise StopRequested(b + 1, total.item(), seen)
    return total.item() / seen


class _StopFlag:
    """Turns the first Ctrl-C (SIGINT) into a request to stop after the current step, so the saved state is
    consistent; a second Ctrl-C interrupts at once. Only in the main thread of a single-process run."""

    def __init__(self, install: bool = True) -> None:
        self._set = False
        self._previous = None
        if install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        self._set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def is_set(self) -> bool:
        return self._set

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def model_config(cfg: TrainConfig, info: DatasetInfo) -> ModelConfig:
    """The architecture follows the data: channels, image size and class count come from the data set."""
    return ModelConfig(
        name=cfg.model, in_channels=info.channels, image_size=info.image_size,
        num_classes=len(info.class_names), dropout=cfg.dropout,
    )


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle for ``epoch`` (1-based) depends only on (seed, epoch), so a resumed run replays it exactly."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_resume(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved config and payload of ``<run_dir>/last.pt``, for ``--resume``."""
    path = Path(run_dir) / "last.pt"
    if not Path(run_dir).is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    payload = checkpoint.load(path)
    for key in ("optimizer", "epoch", "train_config", "rng", "metrics"):
        if key not in payload:
            raise UserError(f"{path} is not a resumable checkpoint (no {key!r}); it may be a model.pt")
    return TrainConfig.from_dict(payload["train_config"]), payload


@dataclass
class Data:
    """The tensors one run trains and evaluates on, normalised, on the device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor  # validation split with val_size, else the test set
    eval_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def prepare_data(cfg: TrainConfig, splits: Splits, device: torch.device) -> Data:
    info = splits.info
    n_total = len(splits.train_labels)
    if cfg.val_size >= n_total:
        raise UserError(f"--val-size {cfg.val_size} leaves no training images (there are {n_total})")
    # The validation split is the *last* val_size training images: fixed, whatever the seed, so runs with
    # different seeds are selected on the same images (10,000 gives the classic 50,000/10,000 split).
    n_fit = n_total - cfg.val_size
    n_train = min(cfg.train_subset, n_fit) if cfg.train_subset else n_fit
    to_dev = lambda imgs: model_input(imgs, info.mean, info.std, device)  # noqa: E731
    test_x, test_y = to_dev(splits.test_images), splits.test_labels.to(device)
    train_x, train_y = to_dev(splits.train_images[:n_train]), splits.train_labels[:n_train].to(device)
    if cfg.val_size:
        eval_x, eval_y = to_dev(splits.train_images[n_fit:]), splits.train_labels[n_fit:].to(device)
    else:
        eval_x, eval_y = test_x, test_y
    return Data(train_x, train_y, eval_x, eval_y, test_x, test_y)


def fit(
    cfg: TrainConfig,
    splits: Splits,
    device: torch.device,
    run_dir: Path,
    reporter: Reporter | None = None,
    resume: dict[str, Any] | None = None,
    ctx: DistContext = SINGLE,
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``splits`` and write the run folder; return the summary dict.

    ``resume`` is a ``last.pt`` payload; training continues after its last completed epoch. Under
    torchrun (``ctx``), every process trains its shard of each batch and only rank 0 writes files.
    """
    reporter = reporter or Reporter()
    t_start = time.perf_counter()
    if device.type == "cpu":
        flush_denormals()  # subnormal arithmetic slows late epochs by ~10 %
    info = splits.info
    mcfg = model_config(cfg, info)
    data = prepare_data(cfg, splits, device)
    n_train = len(data.train_y)
    check_batch(cfg.batch_size, ctx)
    n_batches = (n_train + cfg.batch_size - 1) // cfg.batch_size
    if ctx.enabled and 0 < n_train % cfg.batch_size < ctx.world_size:
        n_batches -= 1  # a last batch smaller than the process count would leave a process without images
    # this process's share of the training set each epoch, and its evaluation shard
    local_count = sum(len(range(ctx.rank, min(cfg.batch_size, n_train - b * cfg.batch_size), ctx.world_size))
                      for b in range(n_batches))
    eval_x, eval_y = data.eval_x[ctx.rank :: ctx.world_size], data.eval_y[ctx.rank :: ctx.world_size]
    total_steps = n_batches * cfg.epochs
    split = "val" if cfg.val_size else "test"

    amp_dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # weight init and dropout
    model = build_model(mcfg).to(device, memory_format=preferred_memory_format(device))
    optimizer = make_optimizer(cfg, model.parameters(), device)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    state = TrainState()
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        for group in optimizer.param_groups:  # flags given with --resume win over the saved hyperparameters
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
            if "momentum" in group:
                group["momentum"] = cfg.momentum
        if ema is not None:
            ema.model.load_state_dict(resume["ema_state_dict"])
            ema.updates = int(resume["ema_updates"])
        state = TrainState(epoch=int(resume["epoch"]), rows=list(resume["metrics"]),
                           train_seconds=float(resume.get("train_seconds", 0.0)),
                           best_val=float(resume.get("best_val", -1.0)), best_epoch=int(resume.get("best_epoch", 0)))
        _set_rng_state(resume["rng"], device)
    # The module that trains; checkpoints always take the plain `model`'s weights, which it shares.
    train_model = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    augment = None
    if cfg.augment:
        aug = AffineAugment(cfg.aug_rotate, cfg.aug_translate, cfg.aug_scale, cfg.aug_flip)
        background = model_input(torch.zeros(1, info.channels, 1, 1, dtype=torch.uint8), info.mean, info.std, device)
        aug_gen = torch.Generator(device=device)
        augment = lambda x: aug(x, background, aug_gen)  # noqa: E731

    static = None
    if cfg.cuda_graphs:
        if ctx.enabled:
            raise UserError("--cuda-graphs works in a single process; drop it under torchrun")
        static = StaticStep(model, optimizer, data.train_x, data.train_y, cfg.batch_size, amp_dtype,
                            cfg.label_smoothing)

    precision = str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"
    if ctx.is_main:
        fileio.write_json(run_dir / "config.json", {
            "train": cfg.to_dict(), "model": mcfg.to_dict(), "dataset": checkpoint.dataset_dict(info),
            "device": str(device), "autocast": precision, "world_size": ctx.world_size,
            "environment": runs.environment(),
        })
    params = count_parameters(model)
    reporter.start({"device": str(device), "precision": precision, "params": params, "n_train": n_train,
                    "n_test": len(data.eval_y), "split": split, "n_batches": n_batches,
                    "start_epoch": state.epoch + 1, "epochs": cfg.epochs, "run_dir": str(run_dir),
                    "world_size": ctx.world_size})
    best_state = None  # the selected weights, in memory, with val_size

    # Inside an epoch (a run stopped with Ctrl-C): where to pick up.
    partial = resume.get("partial") if resume is not None else None
    stop = _StopFlag(install=not ctx.enabled)
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            perm = epoch_permutation(n_train, cfg.seed, epoch).to(device)
            if augment is not None:
                if partial:
                    aug_gen.set_state(partial["aug_rng"].to(aug_gen.get_state().device))
                else:
                    aug_gen.manual_seed(cfg.seed * 1_000_003 + epoch)  # like the shuffle: replayable on resume
            extras = StepExtras(
                label_smoothing=cfg.label_smoothing, augment=augment, ema=ema, first_step=(epoch - 1) * n_batches,
                lr_at=None if cfg.schedule == "constant" else
                (lambda step: learning_rate(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup)),
                start_batch=partial["batches_done"] if partial else 0,
                carried=(partial["loss_sum"], partial["seen"]) if partial else (0.0, 0),
                stop_requested=stop.is_set, static=static,
            )
            partial = None
            _sync(device)
            t0 = time.perf_counter()
            try:
                train_loss = train_epoch(train_model, optimizer, data.train_x, data.train_y, perm, cfg.batch_size,
                                         epoch=epoch, amp_dtype=amp_dtype, log_every=cfg.log_every,
                                         on_step=reporter.step, extras=extras, n_batches=n_batches,
                                         shard=(ctx.rank, ctx.world_size))
            except DivergedError as exc:
                raise DivergedError(f"{exc}. The last good checkpoint is kept in {run_dir}") from None
            except StopRequested as halt:
                state.train_seconds += time.perf_counter() - t0
                if ctx.is_main:
                    _save_epoch(run_dir, model, None, mcfg, info, optimizer, cfg, state, device, ema, save_model=False,
                                partial={"batches_done": halt.batches_done, "loss_sum": halt.loss_sum, "seen": halt.seen,
                                         "aug_rng": aug_gen.get_state() if augment is not None else torch.zeros(0)})
                raise Interrupted(
                    f"interrupted at epoch {epoch}, batch {halt.batches_done} of {n_batches}; saved {run_dir / 'last.pt'}. "
                    f"Continue with: mnist train --resume {run_dir}"
                ) from None
            _sync(device)
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds

            if ctx.enabled:  # the mean over all processes' images
                pair = ctx.all_reduce_sum(torch.tensor([train_loss * local_count, local_count], dtype=torch.float64, device=device))
                train_loss = (pair[0] / pair[1]).item()
            scored = ema.model if ema is not None else model
            result = evaluate(scored, eval_x, eval_y, cfg.eval_batch_size, amp_dtype, reduce=ctx.all_reduce_sum)
            row = {
                "epoch": epoch,
                "train_loss": round(train_loss, 6),
                f"{split}_loss": round(result["loss"], 6),
                f"{split}_accuracy": round(result["accuracy"], 4),
                "lr": lr_value(optimizer.param_groups[0]["lr"]),
                "seconds": round(seconds, 3),
            }
            state.rows.append(row)
            state.epoch = epoch
            improved = result["accuracy"] > state.best_val
            if improved:
                state.best_val, state.best_epoch = result["accuracy"], epoch
                if cfg.val_size:
                    best_state = checkpoint.plain_state_dict(scored)
            # Without a validation split the model kept is the last one (the guide's behaviour); with one, the best.
            if ctx.is_main:
                _save_epoch(run_dir, model, scored, mcfg, info, optimizer, cfg, state, device, ema,
                            save_model=improved or not cfg.val_size)
            reporter.epoch(row)
    finally:
        stop.uninstall()

    summary = {
        "epochs": cfg.epochs,
        "params": params,
        "device": str(device),
        "precision": precision,
        "seed": cfg.seed,
        "model": cfg.model,
        "recipe": cfg.recipe,
        "dataset": info.name,
        "run_dir": str(run_dir),
    }
    if cfg.val_size:
        # The test set is looked at once, for the model the validation split chose.
        best = build_model(mcfg).to(device, memory_format=preferred_memory_format(device))
        best.load_state_dict(best_state if best_state is not None else checkpoint.load(run_dir / "model.pt")["state_dict"])
        test = evaluate(best, data.test_x[ctx.rank :: ctx.world_size], data.test_y[ctx.rank :: ctx.world_size],
                        cfg.eval_batch_size, amp_dtype, reduce=ctx.all_reduce_sum)
        summary.update({"best_epoch": state.best_epoch, "val_accuracy": state.best_val,
                        "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 6)})
    else:
        summary.update({"test_accuracy": state.rows[-1]["test_accuracy"], "test_loss": state.rows[-1]["test_loss"]})
    summary.update({"train_seconds": round(state.train_seconds, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
                    "world_size": ctx.world_size})
    if ctx.enabled:
        summary["weights_identical_across_ranks"] = same_on_all_ranks(list(model.state_dict().values()), ctx)
    if ctx.is_main:
        fileio.write_json(run_dir / "summary.json", summary)
    ctx.barrier()  # nobody leaves (and tears the group down) while rank 0 is still writing
    return summary


def _save_epoch(
    run_dir: Path, model: nn.Module, scored: nn.Module, mcfg: ModelConfig, info: DatasetInfo,
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, state: TrainState, device: torch.device,
    ema: EMA | None, save_model: bool, partial: dict[str, Any] | None = None,
) -> None:
    """After each epoch: metrics.csv, model.pt (the evaluated weights) and last.pt, each replaced atomically.

    ``partial`` marks a last.pt written inside an epoch (after Ctrl-C): how far that epoch got.
    """
    fileio.write_csv(run_dir / "metrics.csv", state.rows)
    if save_model:
        checkpoint.save(run_dir / "model.pt", checkpoint.model_payload(scored, mcfg, info))
    payload = checkpoint.model_payload(model, mcfg, info)  # the raw training weights, to continue from
    payload.update({
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "metrics": state.rows,
        "train_seconds": state.train_seconds,
        "best_val": state.best_val,
        "best_epoch": state.best_epoch,
        "train_config": cfg.to_dict(),
        "rng": _rng_state(device),
    })
    if ema is not None:
        payload["ema_state_dict"] = checkpoint.plain_state_dict(ema.model)
        payload["ema_updates"] = ema.updates
    if partial is not None:
        payload["partial"] = partial
    checkpoint.save(run_dir / "last.pt", payload)
