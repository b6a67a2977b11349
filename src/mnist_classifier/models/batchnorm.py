"""Batch norm in training mode and the ReLU after it, as one kernel on a CPU (``bn_relu.cpp``; issue 24).

``batch_norm_relu(bn, relu, x)`` is ``relu(bn(x))``. Where the kernel applies, it gives torch's output, running
statistics and gradients to rounding: its sums are taken in another order than torch's. It applies to a plain
``BatchNorm2d`` (affine, tracking running statistics with a momentum, fp32 weights) in training mode and a plain
``ReLU``, hook-free, on a 4-D CPU tensor in channels_last with a multiple of 16 channels, in fp32 or in bf16
(under bf16 autocast a convolution hands batch norm a bf16 map; torch's layer then computes in fp32 and rounds
its output to bf16, and so does the kernel), outside tracing, export, torch.compile and torch.func's
transforms, with the kernel built. Everything else gets torch's layers: eval mode (the running statistics),
``--precise-bn``'s cumulative average (momentum None). A backward asked for with ``create_graph`` runs as
torch's layers on the same inputs, so its result can be differentiated again.

The fast models take it (``conv_bn(..., bn_kernel=True)``); bn-cnn and res-cnn keep torch's, on which the
best recipe's 99.72 % was measured.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .pooling import LANES, SUFFIX, hook_free, plain_tensor_path

SOURCE = Path(__file__).with_name("bn_relu.cpp")
_P, _I64, _INT, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {"bn_relu_forward": [_P] * 7 + [_I64] * 2 + [_F64] * 2 + [_INT],
               "bn_relu_backward": [_P] * 6 + [_I64] * 2 + [_INT]}


def _kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel ``name`` for the maps' ``dtype`` (fp32, or autocast's bf16), None where it cannot be built."""
    return native.function(SOURCE, f"{name}_{SUFFIX[dtype]}", _SIGNATURES[name])


def _fp32(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def bn_relu_applies(bn: nn.Module, relu: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``batch_norm_relu`` runs the kernel on ``x`` (otherwise torch's layers)."""
    return (plain_tensor_path() and type(bn) is nn.BatchNorm2d and type(relu) is nn.ReLU and hook_free(bn, relu)
            and bn.training and bn.track_running_stats and bn.momentum is not None and bn.affine
            and _fp32(bn.weight, bn.bias, bn.running_mean, bn.running_var)
            and x.device.type == "cpu" and x.dtype in SUFFIX and x.dim() == 4 and x.shape[1] % LANES == 0
            and x.shape[0] * x.shape[2] * x.shape[3] > 1  # torch's error for a single value per channel stays
            and x.is_contiguous(memory_format=torch.channels_last)
            and _kernel("bn_relu_forward", x.dtype) is not None)


class _NativeBatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, momentum: float, eps: float) -> torch.Tensor:
        b, c, h, w = x.shape  # (B, C, H, W), channels_last: (B * H * W, C) in memory
        y = torch.empty_like(x, memory_format=torch.channels_last)
        # for the backward: this batch's mean and 1 / std, the scale they make, and the bias
        stats = torch.empty(4, c, dtype=torch.float32)
        _kernel("bn_relu_forward", x.dtype)(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), stats.data_ptr(), running_mean.data_ptr(),
            running_var.data_ptr(), b * h * w, c, eps, momentum, torch.get_num_threads())
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        x, weight, bias, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: torch's layers record the gradient's own graph
            again = F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps))
            wanted = [t for t in (x, weight, bias) if t.requires_grad]
            grads = iter(torch.autograd.grad(again, wanted, grad_y, create_graph=True))
            return (*(next(grads) if t.requires_grad else None for t in (x, weight, bias)), None, None, None, None)
        b, c, h, w = x.shape
        grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)  # written whole by the kernel
        grad_w, grad_b = torch.empty(c, dtype=torch.float32), torch.empty(c, dtype=torch.float32)
        _kernel("bn_relu_backward", x.dtype)(grad_y.data_ptr(), x.data_ptr(), stats.data_ptr(), grad_x.data_ptr(),
                                             grad_w.data_ptr(), grad_b.data_ptr(), b * h * w, c,
                                             torch.get_num_threads())
        return grad_x, grad_w, grad_b, None, None, None, None


def batch_norm_relu(bn: nn.BatchNorm2d, relu: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
    """``relu(bn(x))``: the kernel where ``bn_relu_applies``, else torch's layers."""
    if not bn_relu_applies(bn, relu, x):
        return relu(bn(x))
    if bn.num_batches_tracked is not None:  # as torch's forward counts it (read only where momentum is None)
        bn.num_batches_tracked.add_(1)
    return _NativeBatchNormReLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps)
