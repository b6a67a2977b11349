"""2x2 max-pooling (and the ReLU after it) on a CPU through this package's own kernel, ``pool2x2.cpp``.

The kernel gives torch's outputs and gradients exactly, ties and NaN included (tests/test_pooling.py), but
keeps a one-byte index per output where torch keeps eight, and its backward writes each input once instead
of zero-filling a buffer and scattering into it. In the guide CNN's bf16 training step on a 2-core Zen 4 the
two pools, forward and backward, took about a third of the time (BENCHMARKS.md).

It runs where it can: a float32 or bfloat16 CPU tensor in channels_last with a multiple of 16 channels,
outside tracing, export and torch.compile, with the kernel built (``native.load``). Everything else, and
any machine without a C++ compiler, gets torch's ``max_pool2d``, so models, checkpoints and exports are the
same either way.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import native

SOURCE = Path(__file__).with_name("pool2x2.cpp")
LANES = 16  # the kernel's inner loop: channels come in blocks of 16
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_ARGS = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 4


def _kernels() -> ctypes.CDLL | None:
    lib = native.load(SOURCE)
    if lib is not None and lib.pool2x2_forward_f32.argtypes is None:  # declared once per process
        for suffix in SUFFIX.values():
            getattr(lib, f"pool2x2_forward_{suffix}").argtypes = [*_ARGS, ctypes.c_int, ctypes.c_int]
            getattr(lib, f"pool2x2_backward_{suffix}").argtypes = [*_ARGS, ctypes.c_int]
    return lib


def native_applies(x: torch.Tensor) -> bool:
    """Whether ``max_pool2x2`` runs the package's kernel on ``x`` (otherwise torch's)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False  # exporters and compilers see torch's own operators
    return (x.device.type == "cpu" and x.dtype in SUFFIX and x.dim() == 4 and x.shape[1] % LANES == 0
            and x.shape[2] >= 2 and x.shape[3] >= 2 and x.is_contiguous(memory_format=torch.channels_last)
            and _kernels() is not None)


class _NativePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:  # x: (B, C, H, W), channels_last
        b, c, h, w = x.shape
        y = torch.empty((b, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
        which = torch.empty((b, h // 2, w // 2, c), dtype=torch.uint8)  # the winner of each window, 4: ReLU'd
        kernel = getattr(_kernels(), f"pool2x2_forward_{SUFFIX[x.dtype]}")
        kernel(x.data_ptr(), y.data_ptr(), which.data_ptr(), b, h, w, c, int(relu), torch.get_num_threads())
        ctx.save_for_backward(which)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        (which,) = ctx.saved_tensors
        b, c, h, w = ctx.input_shape
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty((b, c, h, w), dtype=grad_y.dtype, memory_format=torch.channels_last)
        if h % 2 or w % 2:
            grad_x.zero_()  # floor mode: the last row or column is in no window, and the kernel skips it
        kernel = getattr(_kernels(), f"pool2x2_backward_{SUFFIX[grad_y.dtype]}")
        kernel(grad_y.data_ptr(), which.data_ptr(), grad_x.data_ptr(), b, h, w, c, torch.get_num_threads())
        return grad_x, None


def max_pool2x2(x: torch.Tensor, relu: bool = False, native_ok: bool = True) -> torch.Tensor:
    """``max_pool2d(x, 2, 2)``, then ReLU if ``relu``: the package's kernel where it applies, else torch's."""
    if native_ok and native_applies(x):
        return _NativePool.apply(x, relu)
    y = F.max_pool2d(x, 2, 2)
    return F.relu(y) if relu else y


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (2x2 windows, stride 2) whose forward may also apply the ReLU that follows it.

    Pool then ReLU is the same function as ReLU then pool, with the same gradients (ReLU is monotonic), and
    fused it reads and writes each value once. ``native = False`` makes it torch's pooling (benchmarks).
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)
        self.native = True

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return max_pool2x2(x, relu, self.native)
