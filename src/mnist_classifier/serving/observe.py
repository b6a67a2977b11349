"""ASGI middleware that gives every request an id, counts and times it, and writes the access log.

The id is the client's ``X-Request-ID`` when that is a short token (so a proxy's id carries through), else
``<process prefix>-<counter>``; it is sent back in ``x-request-id``. The access log is one JSON line per
request on stderr, off by default and sampled by ``access_log`` (0-1), so logging never dominates the cost.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from itertools import count
from typing import TextIO

from .metrics import Metrics

_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class Observe:
    """Request id, metrics and the sampled JSON access log for every HTTP request."""

    def __init__(self, app, metrics: Metrics, access_log: float = 0.0, stream: TextIO | None = None) -> None:  # noqa: ANN001
        self.app, self.metrics, self.sample = app, metrics, access_log
        self.stream = stream or sys.stderr
        self.prefix = f"{os.getpid():x}{random.getrandbits(16):04x}"  # unique per process, also across restarts
        self.counter = count(1)

    def _request_id(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        for name, value in headers:
            if name == b"x-request-id" and _CLIENT_ID.fullmatch(value):
                return value
        return f"{self.prefix}-{next(self.counter)}".encode()

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204 - ASGI signature
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        rid = self._request_id(scope.get("headers") or [])
        status = 500  # what the server answers when the app fails before starting a response

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            self.metrics.observe_request(scope["path"], status, seconds)
            if self.sample > 0 and (self.sample >= 1 or random.random() < self.sample):
                self._log(scope, rid, status, seconds)

    def _log(self, scope, rid: bytes, status: int, seconds: float) -> None:  # noqa: ANN001
        client = scope.get("client") or ("", 0)
        line = {"ts": round(time.time(), 3), "request_id": rid.decode(), "method": scope["method"],
                "path": scope["path"], "status": status, "ms": round(seconds * 1000, 2), "client": client[0]}
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()
