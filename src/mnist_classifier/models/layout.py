"""Two rearrangements of a network's values whose torch operators are slow on a CPU: the head's flatten of a
channels_last feature map, and the fast models' pixel unshuffle. Each gives the same values as torch's.

**The flatten.** On a CPU `mnist train` runs the convolutions in channels_last. Flattening such a map for the
linear head copies it into (C, H, W) order, so the gradient that comes back through the flatten is in (C, H, W)
order too, while the ReLU before it saved its output in channels_last. torch's ReLU backward
(``threshold_backward``) on two tensors of different layouts takes a slow path: 484 µs against 20 µs for the fast
models' last map (256, 48, 3, 3), held to AVX2 on a 2-core Xeon (BENCHMARKS.md, "the head's flatten"). ``Flatten``
copies the gradient back into channels_last on its way out instead, one copy of the map, so the layers below see
one layout. The values are the same; only where they sit in memory changes.

**The unshuffle.** torch's ``pixel_unshuffle`` on a CPU computes every element's source position itself: 308 µs
for the fast models' (256, 1, 24, 24) crop, held to AVX2, where the same permutation as a reshape, a permute and
one copy takes 56 µs.
"""

from __future__ import annotations

import torch
from torch import nn

from .pooling import plain_tensor_path


class _FlattenChannelsLast(torch.autograd.Function):
    """(B, C, H, W) channels_last -> (B, C*H*W) in (C, H, W) order, as torch.flatten; the gradient goes back
    as (B, C, H, W) channels_last. Its backward is torch's operators, so it can be differentiated again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        ctx.shape = x.shape
        return torch.flatten(x, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad.view(ctx.shape).contiguous(memory_format=torch.channels_last)


def grad_in_channels_last(x: torch.Tensor) -> bool:
    """Whether ``Flatten`` hands ``x``'s gradient back in channels_last: a 4-D map stored so (a 1x1 map is both
    layouts at once), in a backward to come, outside exporters, compilers and torch.func's transforms."""
    return (x.dim() == 4 and x.requires_grad and torch.is_grad_enabled() and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) and plain_tensor_path())


class Flatten(nn.Flatten):
    """``nn.Flatten()`` (from dim 1), whose gradient keeps a channels_last input's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.start_dim, self.end_dim) == (1, -1) and grad_in_channels_last(x):
            return _FlattenChannelsLast.apply(x)
        return super().forward(x)


def unshuffle_as_copy(x: torch.Tensor, factor: int) -> bool:
    """Whether ``PixelUnshuffle`` rearranges ``x`` as one strided copy: a 4-D CPU tensor whose sides ``factor``
    divides, outside exporters and compilers (which see torch's operator, as everywhere else)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[2] % factor == 0 and x.shape[3] % factor == 0
            and plain_tensor_path())


class PixelUnshuffle(nn.PixelUnshuffle):
    """``nn.PixelUnshuffle``: each f x f block of pixels becomes f*f channels, (B, C, H, W) -> (B, C*f*f, H/f,
    W/f), in (C, row in block, column in block) order; on a CPU as one strided copy (contiguous output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downscale_factor
        if not unshuffle_as_copy(x, f):
            return super().forward(x)
        b, c, h, w = x.shape
        blocks = x.reshape(b, c, h // f, f, w // f, f)  # (B, C, H/f, row, W/f, column)
        return blocks.permute(0, 1, 3, 5, 2, 4).reshape(b, c * f * f, h // f, w // f)
