"""Adam's update on a CPU through torch's functional ``adam``, without ``Adam.step``'s Python around it.

Why: at the guide's batch of 64 a CPU step takes about 3 ms, and ``Adam.step`` took 0.30 ms of it in a throw-away
loop (2-core Xeon held to AVX-512), its fused kernel 0.15 ms. The rest is the wrapper around the kernel: a
profiler scope, the hook loops, grad mode and dynamo's graph breaks, the lists rebuilt from every parameter's
state. ``torch.optim.adam.adam``, the public functional that ``Adam.step`` itself calls, took 0.20 ms on the same
tensors.

It is the same update: that call with the arguments ``Adam.step`` passes, on torch's own state
(``optimizer.state[p]``) and on each group's settings as they are at that step. The learning-rate schedule,
checkpoints and resumes see torch's optimizer unchanged. It applies only where nothing else would notice: a plain
``torch.optim.Adam`` or ``AdamW``, fused, on CPU tensors, not amsgrad, capturable or differentiable, with no step
hook of its own or registered for all optimizers, a ``step`` nobody wrapped (a torch LR scheduler wraps it to count
calls), and no torch profiler running (its trace names each step by ``Adam.step``'s scope). And only once every
parameter with a gradient has its state: the first step is ``Adam.step``'s, which creates it. Anything else calls
``optimizer.step()``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim import optimizer as torch_optimizer
from torch.optim.adam import adam


class GroupTensors(NamedTuple):
    """One param group's tensors as ``Adam.step`` gathers them: the parameters with a gradient, in order."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]


class AdamUpdate:
    """Called, it takes one step of ``optimizer``, as ``optimizer.step()`` does."""

    def __init__(self, optimizer: torch.optim.Adam) -> None:
        self.optimizer = optimizer

    @staticmethod
    def for_optimizer(optimizer: torch.optim.Optimizer) -> AdamUpdate | None:
        """The update for ``optimizer``, or None for any optimizer but torch's own Adam and AdamW."""
        return AdamUpdate(optimizer) if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) else None

    def __call__(self) -> None:
        groups = self.ready()
        if groups is None:
            self.optimizer.step()
            return
        with torch.no_grad():  # what Adam.step sets for a non-differentiable optimizer
            for group, tensors in zip(self.optimizer.param_groups, groups):
                self._update(group, tensors)

    def ready(self) -> list[GroupTensors] | None:
        """Every group's tensors where this step may take the functional call, else None. Read each step: a
        hook, a scheduler, a group's settings or a parameter's gradient may change between steps."""
        if not self._unwatched():
            return None
        groups = [self._tensors(group) for group in self.optimizer.param_groups]
        return None if any(tensors is None for tensors in groups) else groups  # type: ignore[return-value]

    def _unwatched(self) -> bool:
        """No step hook, no wrapped ``step`` and no profiler. A torch without one of these hook tables (or without
        the profiler's probe) gets ``Adam.step``."""
        opt = self.optimizer
        tables = (getattr(opt, "_optimizer_step_pre_hooks", None), getattr(opt, "_optimizer_step_post_hooks", None),
                  getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
                  getattr(torch_optimizer, "_global_optimizer_post_hooks", None))
        profiling = getattr(torch.autograd, "_profiler_enabled", lambda: True)()
        return not profiling and "step" not in vars(opt) and all(table is not None and not table for table in tables)

    def _tensors(self, group: dict) -> GroupTensors | None:
        """``group``'s tensors, or None where its settings or a parameter rule the functional call out."""
        if not group["fused"] or group["amsgrad"] or group["capturable"] or group["differentiable"]:
            return None
        out = GroupTensors([], [], [], [], [])
        for p in group["params"]:
            if p.grad is None:
                continue  # skipped, as Adam.step skips it
            state = self.optimizer.state.get(p)
            if not state or p.grad.is_sparse or p.device.type != "cpu":
                return None  # Adam.step creates the state, or raises its own error for a sparse gradient
            out.params.append(p)
            out.grads.append(p.grad)
            out.exp_avgs.append(state["exp_avg"])
            out.exp_avg_sqs.append(state["exp_avg_sq"])
            out.steps.append(state["step"])
        return out

    def _update(self, group: dict, t: GroupTensors) -> None:
        opt = self.optimizer
        beta1, beta2 = group["betas"]
        adam(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, [], t.steps, foreach=group["foreach"], capturable=False,
             differentiable=False, fused=True, grad_scale=getattr(opt, "grad_scale", None),
             found_inf=getattr(opt, "found_inf", None), has_complex=any(map(torch.is_complex, t.params)),
             decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=False, beta1=beta1, beta2=beta2,
             lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
