"""One training step on fixed buffers, captured once as a CUDA graph and replayed (``--cuda-graphs``).

A small model's step on a GPU is a hundred tiny kernels whose launch costs more than their work; a CUDA
graph launches them all with one call. The captured step reads the batch's indices from a fixed tensor,
gathers the images on the device, runs forward, backward and the optimizer, and leaves the loss in a fixed
tensor. On other devices (and for the last, smaller batch of an epoch) the very same step runs without
capture, so the code path is exercised on a CPU too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy initialisation, cuBLAS workspaces)


class StaticStep:
    """``step(idx, lr)`` = one optimizer step on ``train_x[idx]``; returns the batch's mean loss (a 0-d tensor).

    The returned tensor is overwritten by the next step: add it to an accumulator before calling again.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_x: torch.Tensor, train_y: torch.Tensor,
        batch_size: int, amp_dtype: torch.dtype | None, label_smoothing: float,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.train_x, self.train_y = train_x, train_y
        self.batch_size = batch_size
        self.amp_dtype, self.label_smoothing = amp_dtype, label_smoothing
        self.capture = train_x.device.type == "cuda"  # CUDA graphs exist on CUDA only
        device = train_x.device
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) the batch, filled each step
        # The learning rate lives in a device tensor the captured optimizer reads, so a schedule can change it.
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.eager_steps = 0

    def _body(self, idx: torch.Tensor) -> torch.Tensor:
        x, y = self.train_x[idx], self.train_y[idx]  # (B, C, H, W), (B,)
        # No autocast weight cache: a cached cast would be captured once and never refreshed.
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self.eager_steps += 1
        return self._body(idx)

    def step(self, idx: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        if lr is not None:
            self.lr.fill_(lr)
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
                self.loss = self._body(self.idx)
        self.graph.replay()
        assert self.loss is not None
        return self.loss


def lr_value(group_lr: float | torch.Tensor) -> float:
    """A param group's learning rate as a float, whether a number or the device tensor above."""
    return float(group_lr.item()) if isinstance(group_lr, torch.Tensor) else float(group_lr)

