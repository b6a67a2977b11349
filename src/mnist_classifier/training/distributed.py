"""Data-parallel training across processes and machines with ``torch.distributed`` (launched by torchrun).

The rule: ``--batch-size`` is the *global* batch. Each optimizer step takes the next ``batch_size`` indices of
the epoch's shared-seed permutation, and rank r of W trains on every W-th of them (``idx[r::W]``).
DistributedDataParallel averages the W gradients, which equals the gradient of the whole batch, so the
learning rate needs no scaling and N processes train the same model as one (up to float summation order
and batch-norm statistics, which are per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: object = None  # the process group of ``MaxVote``: gloo, on the CPU beside the training's

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's share of ``tensor`` along its first dimension: every world-th row from its rank."""
        return tensor[self.rank :: self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes (in place, and returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = DistContext()


class MaxVote:
    """The largest of one integer per process, taken in the background, for a question asked after every step:
    ``put`` starts a round with this process's value and returns the result of the round before it (0 for the
    first); ``finish`` waits for the round in flight. Rounds that waited made the guide's torchrun epoch 1.15x
    slower in one of two measurements on 2 cores (about 1.2 ms of an 8 ms step: each process must be scheduled
    to answer); rounds that run during the next step cost no measurable time (BENCHMARKS.md). Every process
    must put as often."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self._box: torch.Tensor | None = None
        self._work = None  # the round in flight

    def put(self, value: int) -> int:
        previous = self.finish()
        self._box = torch.tensor([value], dtype=torch.int64)
        self._work = dist.all_reduce(self._box, op=dist.ReduceOp.MAX, group=self.ctx.control, async_op=True)
        return previous

    def finish(self) -> int:
        """Wait for the round in flight; its result (0 if none was)."""
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._box.item())


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_request: str, timeout_seconds: float) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun described in the environment; return our context and device.

    gloo on CPU, nccl on CUDA (one GPU per process, chosen by LOCAL_RANK). A collective that waits longer
    than ``timeout_seconds`` (a peer died or hangs) raises instead of blocking forever.
    """
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    use_cuda = device_request in ("auto", "cuda") and torch.cuda.is_available()
    if device_request == "cuda" and not use_cuda:
        raise UserError("device 'cuda' was asked for but is not available here")
    if device_request == "mps":
        raise UserError("multi-process training supports cpu (gloo) and cuda (nccl), not mps")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs; use --nproc-per-node <= GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_seconds))
    except (RuntimeError, ValueError, TimeoutError) as exc:
        raise UserError(f"rank {rank} could not join the process group at {where} ({backend}): "
                        f"{str(exc).strip().splitlines()[0][:200]}") from None
    control = dist.new_group(backend="gloo")  # its own connections: a vote never queues behind DDP's gradients
    return DistContext(rank, world, local, control), device


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, ctx: DistContext) -> None:
    """The global batch must split evenly over the processes."""
    if ctx.enabled and batch_size % ctx.world_size:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over {ctx.world_size} processes; --batch-size is the "
            f"global batch, so use a multiple of {ctx.world_size} (e.g. {batch_size - batch_size % ctx.world_size or ctx.world_size})"
        )


def same_on_all_ranks(tensors: list[torch.Tensor], ctx: DistContext) -> bool:
    """Whether every process holds bit-identical ``tensors`` (e.g. the weights): DDP keeps them in step, and
    this checks that it did."""
    if not ctx.enabled:
        return True
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])
