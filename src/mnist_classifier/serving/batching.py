"""Dynamic batching: requests that arrive together share one forward pass.

A request announces how many images it will classify (``batcher.expect(n)``), decodes and prepares them on
its own, then ``submit``s each uint8 ``(C, H, W)`` image and awaits its row of probabilities. A batch goes

- as soon as ``max_batch`` images wait;
- as soon as no announced image is still on its way (every request in this worker is waiting for the
  model): waiting longer would only leave the core idle. Checked two turns of the event loop later, after
  its next poll for input, so that requests that arrived together (read by that poll) all join;
- else when the first waiting image has waited ``max_wait`` seconds (others are still being decoded).

Decoding happens before ``submit``, so a slow decode only ever delays its own request.

Fairness and admission: a batch takes images round-robin over the requests waiting (one each in turn), so
a request for one image rides the next forward pass even behind 64-image batch requests (FIFO made it wait
for all of them: a p99 of 563 ms beside 8 batch clients). A request whose images would take the queue
(announced and waiting) past ``max_queue`` is refused at once with ``Overloaded`` (503, Retry-After)
instead of waiting without bound.

Where the batch runs:

- on the event loop itself (``threaded=False``, the CPU default): the worker's core does one thing at a time
  and a thread would only add hand-offs (measured: ``ThreadPoolExecutor.submit`` alone was 7 % of the
  worker's time holding the GIL);
- on a thread of its own (an accelerator): the event loop reads the next requests while the device computes.
  Images that arrive during a batch go together as soon as it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from .backends import Run


class Overloaded(Exception):
    """The queue is full: come back later (503 with Retry-After)."""


class Batcher:
    """Collects images from concurrent requests into batches for ``run``; one per event loop."""

    def __init__(self, run: Run, max_batch: int, max_wait: float, threaded: bool = False,
                 on_batch: Callable[[int], None] = lambda n: None, max_queue: int = 1 << 30) -> None:
        self.run, self.max_batch, self.max_wait, self.on_batch = run, max_batch, max_wait, on_batch
        self.max_queue = max_queue
        # request number -> its images waiting for a forward pass, in the order their requests first waited
        self.pending: dict[int, list[tuple[torch.Tensor, asyncio.Future]]] = {}
        self.queued = 0  # images in ``pending``
        self.requests = itertools.count()
        self.coming = 0  # images announced by requests and not yet submitted
        self.running = False  # a batch is on the thread
        self.timer: asyncio.TimerHandle | None = None
        self.check_due = False  # a check is scheduled for the end of this turn of the event loop
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="infer") if threaded else None

    @contextlib.contextmanager
    def expect(self, images: int) -> Iterator[Callable[[torch.Tensor], "asyncio.Future"]]:
        """Announce a request's ``images``; yields its ``submit``. Images it never submits (it failed on a bad
        upload, or its client left) are withdrawn on exit. Raises Overloaded when the queue has no room."""
        if self.coming + self.queued + images > self.max_queue:
            raise Overloaded(f"{self.coming + self.queued} images are waiting for the model")
        left, request = [images], next(self.requests)
        self.coming += images

        async def submit(image: torch.Tensor) -> np.ndarray:
            left[0] -= 1
            self.coming -= 1
            return await self._submit(request, image)

        try:
            yield submit
        finally:
            if left[0]:
                self.coming -= left[0]
                self._schedule(asyncio.get_running_loop())

    async def _submit(self, request: int, image: torch.Tensor) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.setdefault(request, []).append((image, future))
        self.queued += 1
        self._schedule(loop)
        return await future

    def _take(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        """Up to ``max_batch`` waiting images, one per request in turn; a request left with images goes to
        the back of the line."""
        batch: list = []
        while self.pending and len(batch) < self.max_batch:
            for request in list(self.pending):
                images = self.pending.pop(request)
                batch.append(images.pop(0))
                if images:
                    self.pending[request] = images  # re-inserted: now the last in turn
                if len(batch) == self.max_batch:
                    break
        self.queued -= len(batch)
        return batch

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.running or not self.pending:
            return
        if self.queued >= self.max_batch:
            self._start(loop)
            return
        if not self.check_due:  # after the callbacks already due: requests read together submit first
            self.check_due = True
            loop.call_soon(self._check, loop)
        if self.timer is None:
            self.timer = loop.call_later(self.max_wait, self._start, loop)

    def _check(self, loop: asyncio.AbstractEventLoop, looks: int = 1) -> None:
        if looks < 2:  # look once more after the loop's next poll, so that requests read by it join too
            loop.call_soon(self._check, loop, looks + 1)
            return
        self.check_due = False
        if self.coming <= 0:
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.running or not self.pending:
            return
        batch = self._take()
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
