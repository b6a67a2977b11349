"""The guide CNN's training pass on a CPU in one call: forward, cross-entropy and backward, without autograd.

Why: at the guide's batch of 64 a CPU step is short (3-4 ms on 2 cores), and autograd's share of it is not:
recording a graph of a dozen nodes, saving their tensors, the two kernels' autograd Functions in Python, then
walking the graph back, and a layout copy of the first linear layer's weight gradient (200,704 floats) that
AccumulateGrad makes. This pass calls the same kernels in the same order (the package's fused first layer and
pool, oneDNN's convolution, MKL's matrix products) and writes the gradients where autograd would. On a 2-core
Xeon held to AVX-512, the step took 3.40 ms against autograd's 3.66 (1.075x; BENCHMARKS.md, "CPU-7, a
twenty-fifth session").

What autograd computes, this computes, to rounding: a few sums run in another order (tests/test_guide_pass.py).
It applies only where it is the same function: the plain ``GuideCNN`` in training mode, fp32 on a CPU,
without dropout, label smoothing or autocast, every parameter training, no hook on a module or a parameter,
and both kernels applying (``fused_conv_applies``, ``wide_conv_applies``). Anything else (bf16, DDP,
torch.compile, a GPU, a frozen layer, ``--dropout``) takes autograd's path, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import pooling  # its predicates by attribute: a benchmark or test that turns a kernel off turns this off
from ..models.cnn import GuideCNN
from ..models.pooling import first_layer_backward, first_layer_forward, pool_forward, wide_layer_backward


class GuidePass:
    """``pass_(x, y)``: the mean cross-entropy of ``model`` on ``x`` (B, C, H, W) fp32 and labels ``y`` (B,),
    detached, with each parameter's gradient added to its ``.grad``, as ``loss.backward()`` would."""

    def __init__(self, model: GuideCNN) -> None:
        self.model = model

    def params(self) -> tuple[torch.nn.Parameter | None, ...]:
        """The weight and bias of conv1, conv2, fc1 and fc2, read each time: a layer may have been replaced."""
        m = self.model
        return tuple(t for layer in (m.conv1, m.conv2, m.fc1, m.fc2) for t in (layer.weight, layer.bias))

    @staticmethod
    def for_step(model: torch.nn.Module, amp_dtype: torch.dtype | None, label_smoothing: float) -> GuidePass | None:
        """The pass for a training step's model, or None where the step's settings rule it out for good."""
        if type(model) is not GuideCNN or amp_dtype is not None or label_smoothing:
            return None
        return GuidePass(model)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether this batch may take the pass; checked every step, since each of these can change between
        steps (the mode, a frozen layer, a replaced layer, a hook, the model moved to another layout or device)."""
        m = self.model
        # an empty batch is left to autograd, whose cross-entropy of nothing is NaN
        return (m.training and torch.is_grad_enabled() and self._layers_as_built()
                and m.dropout.p == 0 and m.pool.native
                and x.dtype == torch.float32 and not x.requires_grad and x.shape[0] > 0
                and all(p is not None and p.requires_grad and not p._backward_hooks
                        and not p._post_accumulate_grad_hooks for p in self.params())
                and pooling.hook_free(*m.modules()) and pooling.fused_conv_applies(m.conv1, x)
                and pooling.wide_conv_applies(m.conv2, self._first_output_like(x)))

    def _layers_as_built(self) -> bool:
        """The layers this pass computes by hand are still the kinds GuideCNN builds (a user may replace one,
        e.g. its ReLU by a GELU); the convolutions are ``fused_conv_applies``' and ``wide_conv_applies``' to check."""
        m = self.model
        return (type(m.relu) is nn.ReLU and type(m.dropout) is nn.Dropout and type(m.pool) is pooling.MaxPool2x2
                and type(m.fc1) is nn.Linear and type(m.fc2) is nn.Linear)

    def _first_output_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped as the first layer's output (0, 16, H/2, W/2): what the second layer sees."""
        return torch.empty((0, self.model.conv1.out_channels, x.shape[2] // 2, x.shape[3] // 2),
                           memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m, b = self.model, x.shape[0]
        x = x.contiguous()  # the first layer's kernel reads NCHW; for one channel, the same memory
        y1, which1 = first_layer_forward(x, m.conv1.weight, m.conv1.bias, relu=True)  # (B, 16, H/2, W/2)
        z2 = F.conv2d(y1, m.conv2.weight, m.conv2.bias, padding=1)  # (B, 32, H/2, W/2), channels_last
        y2, which2 = pool_forward(z2, relu=True)  # (B, 32, H/4, W/4)
        flat = y2.reshape(b, -1)  # (B, 1568) in NCHW order, as torch.flatten gives fc1
        h = torch.addmm(m.fc1.bias, flat, m.fc1.weight.t()).relu_()  # (B, 128)
        logits = torch.addmm(m.fc2.bias, h, m.fc2.weight.t())  # (B, 10)
        log_p = torch.log_softmax(logits, dim=1)
        loss = F.nll_loss(log_p, y)
        # d loss / d logits = (softmax - one-hot) / B, rounded as log_softmax's backward rounds it
        # (one scatter instead of one_hot's range check, fill and scatter: nll_loss has checked the labels)
        one = torch.full((b, 1), -1.0 / b, dtype=log_p.dtype)  # each label's -1/B
        g = log_p.exp_().mul_(1.0 / b).scatter_add_(1, y.unsqueeze(1), one)  # (B, 10)
        g_h = torch.ops.aten.threshold_backward(g @ m.fc2.weight, h, 0.0)  # (B, 128): ReLU's backward, as autograd's
        g_flat = (g_h @ m.fc1.weight).view(y2.shape)  # (B, 32, H/4, W/4), NCHW as flat's order
        g_y1, g_w2, g_b2 = wide_layer_backward(y1, m.conv2.weight, which2, g_flat)
        g_w1, g_b1 = first_layer_backward(x, which1, g_y1, m.conv1.weight.shape)
        grads = (g_w1, g_b1, g_w2, g_b2, g_h.t() @ flat, g_h.sum(0), g.t() @ h, g.sum(0))  # in params() order
        for p, grad in zip(self.params(), grads):
            _accumulate(p, grad)
        return loss


def _accumulate(p: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Add ``grad`` to ``p.grad`` as autograd's AccumulateGrad does: a new gradient takes the parameter's layout."""
    if p.grad is not None:
        p.grad.add_(grad)
    elif grad.stride() == p.stride():
        p.grad = grad
    else:
        p.grad = torch.empty_like(p).copy_(grad)
