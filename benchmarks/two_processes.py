"""The guide step on 2 cores: one process at 2 threads (what `mnist train` does) against two processes at one
thread each, every batch halved between them and the halves' gradients averaged through shared memory (issue 24).

torchrun's DDP runs that split through gloo, whose all-reduce cost ~4 ms a step here (BENCHMARKS.md, "torchrun").
This measures the split without it: the gradients (206,922 floats) go through a shared-memory buffer and one
``multiprocessing.Barrier`` per step, and each process then runs the same fused Adam step on the average, so the
two copies of the weights stay bit-for-bit equal (checked at the end). Both sides train the guide CNN on the real
MNIST images, batch 64, Adam 0.001, channels_last, flush-to-zero; in bf16 (a bf16 copy computes, the fp32
weights step, as `mnist train` does) where the CPU has native bf16, in fp32 elsewhere. They run in alternating
chunks of --chunk steps for --rounds rounds; each figure is a median over rounds of ms per step, and the
workers' step is split into its compute (forward, backward, copying the gradients out), its wait at the barrier
and its update (the average, Adam, the bf16 copy).

    .venv/bin/python benchmarks/two_processes.py --rounds 9 --chunk 100
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

MEAN, STD = 0.1307, 0.3081  # MNIST's training-set mean and std, as `mnist train` normalises


def setup(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The training images (N, 1, 28, 28) normalised, their labels, and the guide CNN as seed 0 makes it."""
    from mnist_classifier.data import load_dataset
    from mnist_classifier.models import ModelConfig, build_model

    splits = load_dataset("mnist", data_dir)
    x = ((splits.train_images.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="guide-cnn")).to(memory_format=torch.channels_last).train()
    return x, splits.train_labels, model


def chunk_batches(round_: int, chunk: int, batch: int, n: int) -> torch.Tensor:
    """The batches of one round, (chunk, batch) indices: the same for both sides."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(round_))[: chunk * batch].view(chunk, batch)


def views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` (P,) cut into tensors shaped as ``like``."""
    out, at = [], 0
    for p in like:
        out.append(flat[at:at + p.numel()].view_as(p))
        at += p.numel()
    return out


def worker(rank: int, args: argparse.Namespace, shared: torch.Tensor, barrier, go, done, out) -> None:  # noqa: ANN001
    """One of the two processes: its half of every batch, one torch thread."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    x, y, model = setup(args.data_dir)
    weights = list(model.parameters())
    bf16 = args.bf16
    net = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model  # the copy that computes
    net_weights = list(net.parameters())
    if bf16:
        x = x.to(torch.bfloat16)
    avg = torch.zeros(shared.shape[-1])
    for p, g in zip(weights, views(avg, weights)):
        p.grad = g  # the optimizer reads the average in place
    slots = [[views(shared[parity, r], weights) for r in range(2)] for parity in range(2)]
    optimizer = torch.optim.Adam(weights, lr=0.001, fused=True)
    phases, step = [0.0, 0.0, 0.0], 0
    for round_ in range(args.rounds):
        go.wait()
        for idx in chunk_batches(round_, args.chunk, args.batch_size, len(y)):
            t0 = time.perf_counter()
            half = idx[rank::2]
            for p in net_weights:
                p.grad = None
            F.cross_entropy(net(x[half]).float(), y[half]).backward()
            parity = step % 2  # two slots: a fast process writes the next step's gradients beside the last ones
            torch._foreach_copy_(slots[parity][rank], [p.grad for p in net_weights])
            t1 = time.perf_counter()
            barrier.wait()
            t2 = time.perf_counter()
            torch.add(shared[parity, 0], shared[parity, 1], out=avg)
            avg.mul_(0.5)  # the mean over the 64 images: both halves hold 32
            optimizer.step()
            if bf16:
                with torch.no_grad():
                    torch._foreach_copy_(net_weights, weights)
            step += 1
            t3 = time.perf_counter()
            for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                phases[i] += dt
        barrier.wait()
        done.set()
    out.put({"rank": rank, "phases_ms": [round(p / step * 1000, 3) for p in phases],
             "weights": torch.cat([p.detach().flatten() for p in weights]).numpy().tobytes()})


def single_step(args: argparse.Namespace):  # noqa: ANN201
    """`mnist train`'s step at the default threads, with the epoch loop's two loss sums."""
    from mnist_classifier.training.step import Bf16WeightsStep, TrainStep

    x, y, model = setup(args.data_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, fused=True)
    step = (Bf16WeightsStep if args.bf16 else TrainStep)(model, optimizer, x, y)
    sums = [torch.zeros(()), torch.zeros(())]

    def run(idx: torch.Tensor) -> None:
        loss = step(idx)
        sums[0] += loss
        sums[1] += loss * len(idx)

    return run, len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--chunk", type=int, default=100, help="steps per side per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    from mnist_classifier.device import cpu_has_native_bf16

    args.bf16 = cpu_has_native_bf16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no parallel op before the fork: OpenMP's thread pool does not survive one
    ctx = mp.get_context("fork")
    shared = torch.zeros(2, 2, 206_922).share_memory_()  # (parity, rank, P) fp32 gradients
    barrier, out = ctx.Barrier(2), ctx.Queue()
    go = [ctx.Event() for _ in range(args.rounds)]
    done = [[ctx.Event() for _ in range(args.rounds)] for _ in range(2)]
    procs = [ctx.Process(target=worker, args=(r, args, shared, barrier, _Seq(go), _Seq(done[r]), out))
             for r in range(2)]
    for p in procs:
        p.start()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    run, n = single_step(args)
    run(torch.arange(args.batch_size))  # warm-up
    single, split = [], []
    for round_ in range(args.rounds):
        t0 = time.perf_counter()
        for idx in chunk_batches(round_, args.chunk, args.batch_size, n):
            run(idx)
        single.append((time.perf_counter() - t0) / args.chunk * 1000)
        t0 = time.perf_counter()
        go[round_].set()
        for events in done:
            events[round_].wait()
        split.append((time.perf_counter() - t0) / args.chunk * 1000)
    reports = sorted((out.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    one, two = statistics.median(single), statistics.median(split)
    print(json.dumps({"precision": "bf16" if args.bf16 else "fp32", "batch": args.batch_size,
                      "one_process_2_threads_ms": round(one, 3), "two_processes_1_thread_ms": round(two, 3),
                      "speed_of_two_processes": round(one / two, 3),
                      "rounds_ms": {"one": [round(v, 3) for v in single], "two": [round(v, 3) for v in split]},
                      "worker_phases_ms": {f"rank {r['rank']}": dict(zip(("compute", "wait", "update"),
                                                                         r["phases_ms"])) for r in reports},
                      "weights_identical": reports[0]["weights"] == reports[1]["weights"]}))


class _Seq:
    """Hands out the next of a list of Events on each call, so a worker waits for (or sets) one per round."""

    def __init__(self, events: list) -> None:
        self.events, self.i = events, 0

    def wait(self) -> None:
        self.events[self.i].wait()
        self.i += 1

    def set(self) -> None:
        self.events[self.i].set()
        self.i += 1


if __name__ == "__main__":
    main()
