"""2x2 max-pooling (and the ReLU after it), and the 3x3 convolution before it, on a CPU through this package's
own kernels (BENCHMARKS.md, "CPU-4, a tenth session").

``pool2x2.cpp`` gives torch's outputs and gradients exactly, ties and NaN included (tests/test_pooling.py),
but keeps a one-byte index per output where torch keeps eight, and its backward writes each input once
instead of zero-filling a buffer and scattering into it.

``conv_pool.cpp`` takes in the convolution before the pool (``MaxPool2x2.after_conv``). For a first layer (up
to 16 input channels: the guide CNN's image, the fast models' image unshuffled into 4) it computes the
convolution inside the pool: its output never reaches memory at full size. Under bf16 autocast (the fast
recipe's precision on a bf16 CPU) it computes in bf16, as autocast's convolution would.
For a wider one (16k input channels) the forward stays torch's convolution, whose oneDNN kernels are fast.
Either way the backward starts from the pool's winners: only a window's winner has a gradient, so the
convolution's weight, bias (and input) gradients need a quarter of the positions a dense backward visits,
and no full-size gradient is ever made. Those gradients are sums taken in another order than torch's, so they
agree to rounding, not bit for bit; the first layer's outputs agree to fp32 rounding too. One exception: in
bf16 on a CPU with AMX the wider layer's backward stays oneDNN's, which runs it on the tiles faster.

They run where they can: float32 or bfloat16 CPU tensors in channels_last with a multiple of 16 channels,
outside autocast (for the wider layer), tracing, export, torch.compile, torch.func's transforms (vmap, grad:
per-sample gradients) and forward-mode AD, with the kernels built (``native.load``). Everything else, and any
machine without a C++ compiler, gets torch's ``conv2d`` and ``max_pool2d``, so models, checkpoints and exports
are the same either way. A backward asked for with ``create_graph`` (a gradient penalty, a Hessian-vector
product) runs as torch's operators from the same winners, so its result can be differentiated again.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from .. import native
from ..device import cpu_has_amx_bf16

SOURCE = Path(__file__).with_name("pool2x2.cpp")
CONV_SOURCE = Path(__file__).with_name("conv_pool.cpp")
LANES = 16  # the kernels' inner loops: channels come in blocks of 16
FIRST_LAYER_CHANNELS = 16  # at most, into the fused first layer: 1 (the guide) and 4 (the fast models) measured
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # kernel name -> argument types: pointers, then sizes (B, [C,] H, W, C or O), flags, threads
    "pool2x2_forward": [_P] * 3 + [_I64] * 4 + [_INT] * 2, "pool2x2_backward": [_P] * 3 + [_I64] * 4 + [_INT],
    "conv_pool_forward": [_P] * 5 + [_I64] * 5 + [_INT] * 2, "conv_pool_backward": [_P] * 5 + [_I64] * 5 + [_INT],
    "conv_pool_backward_wide": [_P] * 7 + [_I64] * 5 + [_INT],
}


def _kernel(source: Path, name: str, dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel ``name`` for ``dtype`` from ``source``'s library, None where that cannot be built."""
    return native.function(source, f"{name}_{SUFFIX[dtype]}", _SIGNATURES[name])


# Whether torch.func's transforms (vmap, grad, jvp) are running: torch's own probe, private but there since 2.0;
# a torch without it gets the kernels under them, which then raise as before.
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def plain_tensor_path() -> bool:
    """Exporters, compilers, torch.func's transforms and forward-mode AD see torch's own operators: the kernels'
    autograd Functions define neither a vmap rule nor a forward derivative."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or _transforms_active() or getattr(forward_ad, "_current_level", -1) >= 0)


def native_applies(x: torch.Tensor) -> bool:
    """Whether ``max_pool2x2`` runs the package's kernel on ``x`` (otherwise torch's)."""
    return (plain_tensor_path() and x.device.type == "cpu" and x.dtype in SUFFIX and x.dim() == 4
            and x.shape[1] % LANES == 0 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last)
            and _kernel(SOURCE, "pool2x2_forward", x.dtype) is not None)


def _plain_conv3x3(conv: nn.Module, x: torch.Tensor) -> bool:
    """A hook-free Conv2d, 3x3, padding 1, stride 1, to a multiple of 16 channels, on a 4-D CPU tensor of its
    own dtype (fp32 or bf16)."""
    return (plain_tensor_path() and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.out_channels % LANES == 0
            and hook_free(conv)  # --whiten-init's hook
            and x.device.type == "cpu" and x.dtype in SUFFIX and conv.weight.dtype == x.dtype
            and (conv.bias is None or conv.bias.dtype == x.dtype)
            and x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a convolution of ``x`` computes in: autocast's bf16 for fp32 under it, else ``x``'s own; None
    under another autocast dtype."""
    if not torch.is_autocast_enabled("cpu"):
        return x.dtype
    return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype == torch.float32 else None


def fused_conv_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``MaxPool2x2.after_conv`` runs ``conv`` and the pool as one kernel: a plain 3x3 convolution of an
    input of at most 16 channels that needs no gradient of its own (a first layer: the guide CNN's image, or
    the fast models' image unshuffled into 4 channels), with or without a bias."""
    return (_plain_conv3x3(conv, x) and conv.in_channels <= FIRST_LAYER_CHANNELS and not x.requires_grad
            and (dtype := _compute_dtype(x)) in SUFFIX and _kernel(CONV_SOURCE, "conv_pool_forward", dtype) is not None)


def wide_conv_applies(conv: nn.Module, x: torch.Tensor, bias_free_ok: bool = False) -> bool:
    """Whether ``MaxPool2x2.after_conv`` runs torch's convolution and the pool kernel forward, and the backward
    of both from the pool's winners: a plain 3x3 convolution of 16k input channels, channels_last, with a bias,
    or without one where the caller opts in (``bias_free_ok``: the fast models' ``conv_bn`` blocks, whose fp32
    step it made 1.05-1.12x faster; BENCHMARKS.md, "CPU-6, a fifteenth session"). bn-cnn and res-cnn keep
    oneDNN's backward, on which the best recipe's 99.72 % was measured: on the kernel, their fp32 steps ran
    1.08-1.19x faster, but the best recipe's first two fp32 seeds gave 99.70 and 99.64 %. Not in bf16 where
    oneDNN has AMX: with its backward on the tiles the guide step took 3.47 and 3.54 ms against the kernel's
    3.71 and 3.93 (BENCHMARKS.md, "CPU-6"); held below AMX, 5.73 and 7.22 against 5.91 and 5.99."""
    return (_plain_conv3x3(conv, x) and conv.in_channels % LANES == 0 and (conv.bias is not None or bias_free_ok)
            and not torch.is_autocast_enabled("cpu")  # autocast would pick the convolution's dtype
            and not (x.dtype == torch.bfloat16 and cpu_has_amx_bf16())
            and x.is_contiguous(memory_format=torch.channels_last)
            and conv.weight.is_contiguous(memory_format=torch.channels_last)
            and _kernel(CONV_SOURCE, "conv_pool_backward_wide", x.dtype) is not None
            and _kernel(SOURCE, "pool2x2_forward", x.dtype) is not None)


def unavailable_note() -> str | None:
    """One line for a CPU run whose kernels cannot be built (MNIST_NATIVE=0 asked for that, so it gets none)."""
    why = native.why_not(SOURCE) or native.why_not(CONV_SOURCE)
    if why is None or why == f"{native.DISABLE}=0":
        return None
    return f"warning: the package's CPU kernels are unavailable ({why}); torch's layers run instead, slower"


def hook_free(*modules: nn.Module) -> bool:
    """Whether no forward hook watches ``modules``: neither their own nor one registered for every module
    (``register_module_forward_hook``). A hooked layer must run as itself, so a kernel that fuses it steps aside."""
    hooks = torch.nn.modules.module
    return not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def pool_forward(x: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool kernel on ``x`` (B, C, H, W), channels_last: the output (B, C, H/2, W/2), channels_last, and the
    winner of each window (B, H/2, W/2, C) as uint8, 4 where the ReLU zeroed it."""
    b, c, h, w = x.shape
    y = torch.empty((b, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    which = torch.empty((b, h // 2, w // 2, c), dtype=torch.uint8)
    kernel = _kernel(SOURCE, "pool2x2_forward", x.dtype)
    kernel(x.data_ptr(), y.data_ptr(), which.data_ptr(), b, h, w, c, int(relu), torch.get_num_threads())
    return y, which


def _to_winners(grad_y: torch.Tensor, which: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The pool's backward as torch's operators, for a backward that must itself be differentiable: each window's
    gradient (B, C, H/2, W/2) at its winner in (B, C, H, W) (``shape``), 0 elsewhere, where the ReLU zeroed the
    window (winner 4) and in a last row or column no window covers. A gather by the winners, as max_pool2d's."""
    b, c, h, w = shape
    ho, wo = h // 2, w // 2
    won = which.unsqueeze(-1) == torch.arange(4, dtype=which.dtype)  # (B, Ho, Wo, C, 4): winner j = 2 dy + dx
    g = torch.where(won, grad_y.permute(0, 2, 3, 1).unsqueeze(-1), 0.0)  # where, not *: inf * 0 would be NaN
    g = g.view(b, ho, wo, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * ho, 2 * wo)  # (B, C, 2Ho, 2Wo)
    return F.pad(g, (0, w - 2 * wo, 0, h - 2 * ho)).contiguous(memory_format=torch.channels_last)


def first_layer_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused first layer's kernel on ``x`` (B, C, H, W), NCHW (``fused_conv_applies``): the pooled output
    (B, O, H/2, W/2), channels_last, and each window's winner (B, H/2, W/2, O) as uint8, 4 where the ReLU zeroed
    it."""
    b, c, h, w = x.shape
    out = weight.shape[0]
    taps = weight.detach().reshape(out, c * 9).contiguous()  # (O, C * 9) in (C, kh, kw) order
    shift = torch.zeros(out, dtype=x.dtype) if bias is None else bias.detach().contiguous()  # (O,)
    y = torch.empty((b, out, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    which = torch.empty((b, h // 2, w // 2, out), dtype=torch.uint8)
    kernel = _kernel(CONV_SOURCE, "conv_pool_forward", x.dtype)
    kernel(x.data_ptr(), taps.data_ptr(), shift.data_ptr(), y.data_ptr(), which.data_ptr(),
           b, c, h, w, out, int(relu), torch.get_num_threads())
    return y, which


def first_layer_backward(x: torch.Tensor, which: torch.Tensor, grad_y: torch.Tensor,
                         weight_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused first layer's weight gradient (``weight_shape``, NCHW) and bias gradient (O,), from its input
    ``x``, its winners ``which`` and its output's gradient ``grad_y`` (B, O, H/2, W/2)."""
    b, c, h, w = x.shape
    out = weight_shape[0]
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    grad_w = torch.empty((out, c * 9), dtype=grad_y.dtype)
    grad_b = torch.empty(out, dtype=grad_y.dtype)  # the kernel always sums it; dropped for a bias-free conv
    kernel = _kernel(CONV_SOURCE, "conv_pool_backward", grad_y.dtype)
    kernel(x.data_ptr(), which.data_ptr(), grad_y.data_ptr(), grad_w.data_ptr(), grad_b.data_ptr(), b, c, h, w,
           out, torch.get_num_threads())
    return grad_w.view(weight_shape), grad_b


def wide_layer_backward(x: torch.Tensor, weight: torch.Tensor, which: torch.Tensor,
                        grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A wider layer's backward from its pool's winners (``wide_conv_applies``): the gradients of its input
    ``x`` (B, C, H, W) and of its weight, both channels_last, and of its bias (O,), from its output's gradient
    ``grad_y`` (B, O, H/2, W/2)."""
    b, c, h, w = x.shape
    out = weight.shape[0]
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)  # written whole by the kernel
    grad_w = torch.empty_like(weight, memory_format=torch.channels_last)  # (O, 3, 3, C) in memory
    grad_b = torch.empty(out, dtype=x.dtype)  # the kernel always sums it; dropped for a bias-free conv
    kernel = _kernel(CONV_SOURCE, "conv_pool_backward_wide", x.dtype)
    kernel(x.data_ptr(), weight.data_ptr(), which.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr(),
           grad_w.data_ptr(), grad_b.data_ptr(), b, h, w, c, out, torch.get_num_threads())
    return grad_x, grad_w, grad_b


class _NativePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:  # x: (B, C, H, W), channels_last
        y, which = pool_forward(x, relu)
        ctx.save_for_backward(which)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        (which,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: torch's operators record the gradient's own graph
            return _to_winners(grad_y, which, ctx.input_shape), None
        b, c, h, w = ctx.input_shape
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty((b, c, h, w), dtype=grad_y.dtype, memory_format=torch.channels_last)
        if h % 2 or w % 2:
            grad_x.zero_()  # floor mode: the last row or column is in no window, and the kernel skips it
        kernel = _kernel(SOURCE, "pool2x2_backward", grad_y.dtype)
        kernel(grad_y.data_ptr(), which.data_ptr(), grad_x.data_ptr(), b, h, w, c, torch.get_num_threads())
        return grad_x, None


class _NativeConvPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
        y, which = first_layer_forward(x, weight, bias, relu)
        ctx.save_for_backward(x, which)
        ctx.weight_shape = weight.shape
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor | None, None]:
        x, which = ctx.saved_tensors
        b, c, h, w = x.shape
        out = ctx.weight_shape[0]
        if torch.is_grad_enabled():  # create_graph: the weight's gradient as torch's operators (x needs none)
            grad_z = _to_winners(grad_y, which, (b, out, h, w))  # (B, O, H, W)
            grad_w = torch.nn.grad.conv2d_weight(x, ctx.weight_shape, grad_z, padding=1)
            return None, grad_w, grad_z.sum((0, 2, 3)) if ctx.has_bias else None, None
        grad_w, grad_b = first_layer_backward(x, which, grad_y, ctx.weight_shape)
        return None, grad_w, grad_b if ctx.has_bias else None, None


class _NativeWideConvPool(torch.autograd.Function):
    """torch's convolution and the pool kernel forward; the backward of both from the pool's winners."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
        z = F.conv2d(x, weight, bias, padding=1)  # (B, O, H, W) channels_last; autograd is off in here
        y, which = pool_forward(z, relu)
        ctx.save_for_backward(x, weight, which)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        x, weight, which = ctx.saved_tensors
        b, c, h, w = x.shape
        out = weight.shape[0]
        if torch.is_grad_enabled():  # create_graph: torch's operators, differentiable in x and weight too
            grad_z = _to_winners(grad_y, which, (b, out, h, w))  # (B, O, H, W)
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_z, padding=1)
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_z, padding=1)
            return grad_x, grad_w, grad_z.sum((0, 2, 3)) if ctx.has_bias else None, None
        grad_x, grad_w, grad_b = wide_layer_backward(x, weight, which, grad_y)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None


def max_pool2x2(x: torch.Tensor, relu: bool = False, native_ok: bool = True) -> torch.Tensor:
    """``max_pool2d(x, 2, 2)``, then ReLU if ``relu``: the package's kernel where it applies, else torch's."""
    if native_ok and native_applies(x):
        return _NativePool.apply(x, relu)
    y = F.max_pool2d(x, 2, 2)
    return F.relu(y) if relu else y


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (2x2 windows, stride 2) whose forward may also apply the ReLU that follows it.

    Pool then ReLU is the same function as ReLU then pool, with the same gradients (ReLU is monotonic), and
    fused it reads and writes each value once. ``native = False`` makes it torch's pooling (and convolution,
    in ``after_conv``) everywhere (benchmarks, tests).
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)
        self.native = True

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return max_pool2x2(x, relu, self.native)

    def after_conv(self, conv: nn.Conv2d, x: torch.Tensor, relu: bool = False,
                   bias_free_ok: bool = False) -> torch.Tensor:
        """``self(conv(x), relu)``: in one kernel where ``fused_conv_applies``, with the backward of both from the
        pool's winners where ``wide_conv_applies`` (for a bias-free ``conv`` only with ``bias_free_ok``), else as
        written."""
        if self.native and fused_conv_applies(conv, x):
            dtype = _compute_dtype(x)  # under autocast, bf16: the casts autocast's convolution would make
            weight, bias = conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)
            return _NativeConvPool.apply(x.to(dtype).contiguous(), weight, bias, relu)
        if self.native and wide_conv_applies(conv, x, bias_free_ok):
            return _NativeWideConvPool.apply(x, conv.weight, conv.bias, relu)
        return self(conv(x), relu)
