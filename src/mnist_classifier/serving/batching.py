"""Dynamic batching: requests that arrive together share one forward pass.

Each request is decoded and prepared on its own, then ``submit``s its uint8 ``(C, H, W)`` image and awaits its
row of probabilities. The first image of a batch waits at most ``max_wait`` seconds for others; a batch goes
as soon as ``max_batch`` images are waiting. Decoding happens before ``submit``, so a slow decode only ever
delays its own request.

Where the batch runs:

- on the event loop itself (``executor=None``, the CPU default): the worker's core does one thing at a time
  and a thread would only add hand-offs (measured: ``ThreadPoolExecutor.submit`` alone was 7 % of the
  worker's time holding the GIL);
- on a thread of its own (an accelerator): the event loop reads the next requests while the device computes.
  Images that arrive during a batch go together as soon as it ends.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

Run = Callable[[torch.Tensor], np.ndarray]  # uint8 (B, C, H, W) -> float32 probabilities (B, classes)


class Batcher:
    """Collects images from concurrent requests into batches for ``run``; one per event loop."""

    def __init__(self, run: Run, max_batch: int, max_wait: float, threaded: bool = False,
                 on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.run, self.max_batch, self.max_wait, self.on_batch = run, max_batch, max_wait, on_batch
        self.pending: list[tuple[torch.Tensor, asyncio.Future]] = []
        self.running = False  # a batch is on the thread
        self.timer: asyncio.TimerHandle | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="infer") if threaded else None

    @property
    def queued(self) -> int:
        return len(self.pending)

    async def submit(self, image: torch.Tensor) -> np.ndarray:
        """Classify one prepared image; returns its probabilities ``(classes,)``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((image, future))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.running or not self.pending:
            return
        if len(self.pending) >= self.max_batch:
            self._start(loop)
        elif self.timer is None:
            self.timer = loop.call_later(self.max_wait, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.running or not self.pending:
            return
        batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
        self.on_batch(len(batch))
        images = torch.stack([image for image, _ in batch])  # (B, C, H, W) uint8
        if self.thread is None:
            try:
                self._deliver(batch, self.run(images), None)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                self._deliver(batch, None, exc)
            self._schedule(loop)
            return
        self.running = True
        done = loop.run_in_executor(self.thread, self.run, images)
        done.add_done_callback(lambda fut: self._finish(loop, batch, fut))

    def _finish(self, loop: asyncio.AbstractEventLoop, batch: list, done: asyncio.Future) -> None:
        self.running = False
        error = done.exception()
        self._deliver(batch, None if error else done.result(), error)
        if self.pending:
            self._start(loop)  # they waited for the whole previous batch already

    @staticmethod
    def _deliver(batch: list, probs: np.ndarray | None, error: BaseException | None) -> None:
        for i, (_, future) in enumerate(batch):
            if future.done():  # its request was cancelled (the client went away)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(probs[i])

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True)
