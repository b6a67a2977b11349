"""ASGI middleware for the end of a drain: what a request still running when ``--drain-timeout`` runs out is told.

On SIGTERM uvicorn waits ``drain_timeout`` seconds for the requests in flight, then cancels the ones still
running and answers 500, with a traceback in the log, for each that had not started its response. Such a
request is no fault of the server's code: the server is going away (a flood of large uploads can queue more
decoding than the drain allows), and another worker, or this one restarted, can answer it. So it gets 503
with Retry-After, as a full queue does, and the log gets one line per worker instead of a traceback each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .limits import send_json

log = logging.getLogger("uvicorn.error")


class DrainCutoff:
    """503 instead of uvicorn's 500 for a request cancelled, before its response started, because the drain ended."""

    def __init__(self, app, draining: Callable[[], bool], drain_timeout: float) -> None:  # noqa: ANN001
        self.app, self.draining, self.drain_timeout, self.cut = app, draining, drain_timeout, 0

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204 - ASGI signature
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):  # noqa: ANN001, ANN202
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started or not self.draining():
                raise  # a response already under way can only be cut off; any other cancellation is not ours
            self.cut += 1
            if self.cut == 1:
                log.warning("the drain's %g s ran out: requests still running are answered 503", self.drain_timeout)
            # the task ends here, answered, instead of propagating the cancellation uvicorn asked for: it does
            # not wait for the task, and the connection closes once the answer is written
            await send_json(send, 503, "the server is shutting down; try again shortly", ((b"retry-after", b"1"),))
