"""Precise batch norm: the running statistics recomputed for the weights a run hands back.

Batch norm keeps an exponential average (momentum 0.1) of the batch statistics of the last few dozen training
steps, each taken with different weights. When an epoch has few steps, or the weights jump, that average lags
behind the weights: a bn-cnn trained on a folder of 96 images (6 steps an epoch) scored 100 % in train mode
and after recalibration, but 41.67 % with its stored statistics (issue 22). ``recalibrate`` replaces them
with a cumulative average (momentum None, as ``torch.optim.swa_utils.update_bn`` and Detectron2's PreciseBN
do) over one pass of training images through the current weights.

The pass differs from ``update_bn`` in two ways, both so that the statistics match the network that
evaluation runs: dropout and stochastic depth are off (they are off in evaluation, and dropout before a batch
norm shifts its variance), and the images are not augmented (evaluation sees plain images).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def live_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The batch-norm layers whose running statistics training updates: those in train mode after
    ``model.train()``. Frozen ones (a pretrained network's kept ImageNet statistics) stay as they are."""
    was_training = model.training
    model.train()
    live = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    model.train(was_training)
    return live


def _reduce_statistics(layers: list[_BatchNorm], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Pool every process's statistics into the whole data's: the mean of the means, and the mean of
    E[x^2] = var + mean^2 less the pooled mean squared (so the spread between processes counts too)."""
    means = [m.running_mean for m in layers]
    squares = [m.running_var + m.running_mean**2 for m in layers]
    flat = torch.cat([t.double().reshape(-1) for t in means + squares] + [torch.ones(1, dtype=torch.float64, device=means[0].device)])
    flat = reduce(flat)
    flat = flat[:-1] / flat[-1]  # the last element counted the processes
    mean_parts = flat[: len(flat) // 2].split([t.numel() for t in means])
    square_parts = flat[len(flat) // 2 :].split([t.numel() for t in means])
    for layer, mean, square in zip(layers, mean_parts, square_parts):
        layer.running_mean.copy_(mean)
        layer.running_var.copy_((square - mean**2).clamp_min(0))


def sample_batches(images: torch.Tensor, indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``images[indices]`` in near-equal batches of about ``batch_size`` and at least two images (batch norm in
    train mode needs two values per channel), gathered one batch at a time so a large sample is never copied
    whole. Nothing when there are fewer than two indices."""
    if len(indices) < 2:
        return
    n_batches = max(1, min(-(-len(indices) // batch_size), len(indices) // 2))
    for chunk in torch.tensor_split(indices, n_batches):
        yield images[chunk]


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[torch.Tensor],
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Recompute the running statistics of ``model``'s live batch-norm layers from ``batches`` of normalised
    images (B, C, H, W) on the model's device; return how many layers changed.

    ``reduce`` sums a tensor over processes (torchrun), so every process ends with the statistics of all
    their images. A model without live batch norm (the guide's CNN) is left untouched at no cost.
    """
    layers = live_batch_norms(model)
    if not layers:
        return 0
    was_training, momenta = model.training, [m.momentum for m in layers]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    model.eval()  # dropout and stochastic depth off, as in evaluation
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every batch counts the same
        layer.train()
    seen = 0
    try:
        for batch in batches:
            model(batch)
            seen += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    if not seen:  # no images here: keep the statistics there were
        for layer, (mean, var, count) in zip(layers, saved):
            layer.running_mean.copy_(mean), layer.running_var.copy_(var), layer.num_batches_tracked.copy_(count)
    if reduce is not None:  # every process joins the reduction, or the others would wait for it forever
        _reduce_statistics(layers, reduce)
    return len(layers) if seen else 0
