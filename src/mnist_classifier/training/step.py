"""One training step: ``step(idx, lr)`` trains on the images ``train_x[idx]`` and returns the batch's mean loss.

``TrainStep`` is the guide's step (forward, cross-entropy, backward, optimizer step), with the options the
recipes add (autocast, label smoothing, batch augmentation). For the guide CNN in fp32 on a CPU its forward,
loss and backward are one pass without autograd (``guide_pass.py``), where that pass is the same function.
``CudaGraphStep`` (``--cuda-graphs``) is the same step on fixed buffers, captured once as a CUDA graph and
replayed: a small model's step on a GPU is a hundred tiny kernels whose launch costs more than their work, and a
graph launches them all with one call. Off CUDA
(and for an epoch's last, smaller batch) it runs uncaptured, so that path is exercised on a CPU too.
``Bf16WeightsStep`` is bf16 training without autocast, for a CPU: a bf16 copy of the model computes, the
fp32 weights are what the optimizer steps and what is saved.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adam_update import AdamUpdate
from .guide_pass import GuidePass
from .optim import group_lr

WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy initialisation, cuBLAS workspaces)


class TrainStep:
    """``step(idx, lr)`` = one optimizer step on ``train_x[idx]`` (``lr``: set first, when a schedule runs)."""

    cache_casts = True  # autocast may reuse its bf16 copies of the weights within a step

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_x: torch.Tensor, train_y: torch.Tensor,
        amp_dtype: torch.dtype | None = None, label_smoothing: float = 0.0,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.train_x, self.train_y = train_x, train_y  # (N, C, H, W) float normalised, (N,) int64, on the device
        self.amp_dtype, self.label_smoothing, self.augment = amp_dtype, label_smoothing, augment
        self.guide_pass = GuidePass.for_step(model, amp_dtype, label_smoothing)  # None: autograd's path always
        self.adam_update = AdamUpdate.for_optimizer(optimizer)  # None: optimizer.step() always

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group_lr(lr, group)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """Forward and backward on one batch (the gradients land in ``.grad``); returns the detached loss."""
        # index_select: the same rows as train_x[idx], in half the time for a batch of 64 on a CPU (25 against 53 us)
        x, y = self.train_x.index_select(0, idx), self.train_y.index_select(0, idx)  # (B, C, H, W), (B,)
        if self.augment is not None:
            x = self.augment(x)
        if self.guide_pass is not None and self.guide_pass.applies(x):
            return self.guide_pass(x, y)
        loss = self.criterion(x, y)
        loss.backward()
        return loss.detach()

    def criterion(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean cross-entropy, through the model (under autocast when ``amp_dtype`` is set)."""
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None,
                            cache_enabled=self.cache_casts):
            return F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def update(self) -> None:
        """The optimizer step, once the gradients are in."""
        self.step_optimizer()

    def step_optimizer(self) -> None:
        """``optimizer.step()``; for torch's Adam on a CPU, the same update without its wrapper (adam_update.py)."""
        if self.adam_update is not None:
            self.adam_update()
        else:
            self.optimizer.step()

    def freeze(self, params: Sequence[nn.Parameter]) -> None:
        """Stop training ``params`` (of the plain model) from the next step on: autograd computes no gradient for
        them, and their ``.grad`` stays None, which every torch optimizer skips (Adam's moments stop with them)."""
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    def __call__(self, idx: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        if lr is not None:
            self.set_lr(lr)
        self.zero_grad()
        loss = self.loss(idx)
        self.update()
        return loss


class Bf16WeightsStep(TrainStep):
    """The bf16 autocast step with the same roundings in fewer calls: a bf16 twin of ``model`` computes the
    forward and backward passes, and two foreach copies per step replace autocast's casts of every weight to
    bf16 and of every weight gradient back to fp32, one op per tensor (16 for the guide CNN's 8 tensors).
    1.035-1.06x the autocast step on a 2-core Zen 4 (BENCHMARKS.md).

    ``model`` keeps the fp32 weights: the optimizer steps them, EMA, evaluation and checkpoints read them.
    Each step copies the twin's bf16 gradients into fp32 gradient buffers (exact), steps the optimizer, and
    rounds the new weights into the twin (round to nearest even, as autocast's cast does). Only for a model
    without buffers (batch norm's running statistics would live in the twin) whose parameters all train.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_x: torch.Tensor,
                 train_y: torch.Tensor, label_smoothing: float = 0.0,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(model, optimizer, train_x, train_y, torch.bfloat16, label_smoothing, augment)
        if not self.eligible(model):
            raise ValueError("Bf16WeightsStep needs a model without buffers whose parameters all train")
        self.twin = copy.deepcopy(model).to(torch.bfloat16)  # the casts autocast would make on the first step
        self.weights, self.twin_weights = list(model.parameters()), list(self.twin.parameters())
        self.grads = [torch.zeros_like(p) for p in self.weights]  # fp32, re-attached every step

    @staticmethod
    def eligible(model: nn.Module) -> bool:
        return next(model.buffers(), None) is None and all(p.requires_grad for p in model.parameters())

    def criterion(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.twin.training != self.model.training:
            self.twin.train(self.model.training)  # dropout follows the mode fit sets on the model
        # the logits in fp32 before the loss, as autocast runs log-softmax and the loss in fp32
        return F.cross_entropy(self.twin(x.to(torch.bfloat16)).float(), y, label_smoothing=self.label_smoothing)

    def zero_grad(self) -> None:
        for p in self.twin_weights:
            p.grad = None

    def freeze(self, params: Sequence[nn.Parameter]) -> None:
        """The twin's copies of ``params`` stop too, and both drop out of the per-step copies."""
        super().freeze(params)
        frozen = {id(p) for p in params}
        keep = [id(p) not in frozen for p in self.weights]  # the twin's and the buffers' lists are in this order
        for twin, kept in zip(self.twin_weights, keep):
            if not kept:
                twin.requires_grad_(False)
                twin.grad = None
        self.weights, self.twin_weights, self.grads = ([x for x, kept in zip(items, keep) if kept]
                                                       for items in (self.weights, self.twin_weights, self.grads))

    def update(self) -> None:
        with torch.no_grad():
            for p, g in zip(self.weights, self.grads):
                p.grad = g  # attributes only, no op: fp32 buffers even if something set .grad to None
            torch._foreach_copy_(self.grads, [p.grad for p in self.twin_weights])  # bf16 -> fp32, exact
            self.step_optimizer()
            torch._foreach_copy_(self.twin_weights, self.weights)  # fp32 -> bf16, round to nearest even


class CudaGraphStep(TrainStep):
    """The same step, captured as a CUDA graph after a few eager steps and replayed from then on.

    The batch's indices are copied into a fixed tensor, and the learning rate lives in a device tensor the
    captured optimizer reads, so a schedule can change it. The returned loss tensor is overwritten by the
    next step: add it to an accumulator before calling again.
    """

    cache_casts = False  # a cached cast would be captured once and never refreshed

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_x: torch.Tensor,
                 train_y: torch.Tensor, batch_size: int, amp_dtype: torch.dtype | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(model, optimizer, train_x, train_y, amp_dtype, label_smoothing)
        self.batch_size = batch_size
        self.capture = train_x.device.type == "cuda"  # CUDA graphs exist on CUDA only
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=train_x.device)  # (B,) filled each step
        for group in optimizer.param_groups:  # a device tensor per group, read by the captured optimizer
            group["lr"] = torch.tensor(float(group["lr"]), device=train_x.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_loss: torch.Tensor | None = None
        self.eager_steps = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(group_lr(lr, group))

    def freeze(self, params: Sequence[nn.Parameter]) -> None:
        """The graph captured the backward of ``params``: it is dropped and captured again, after the warm-up."""
        super().freeze(params)
        self.graph, self.captured_loss, self.eager_steps = None, None, 0

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        self.eager_steps += 1
        return super().__call__(idx)

    def __call__(self, idx: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        if lr is not None:
            self.set_lr(lr)
        if len(idx) != self.batch_size or not self.capture:
            return self._eager(idx)  # the last, smaller batch; or no CUDA: the same step, uncaptured
        self.idx.copy_(idx)
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._eager(self.idx)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.captured_loss = self.loss(self.idx)
                self.optimizer.step()
        self.graph.replay()
        assert self.captured_loss is not None
        return self.captured_loss
