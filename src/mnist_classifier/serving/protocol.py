"""uvicorn's HTTP/1.1 protocols (httptools where installed, else h11) with the limits of the service's edge.

uvicorn closes idle keep-alive connections, and nothing else. Here each connection also gets:

- a deadline for its request headers (a client sending them a byte at a time, slowloris, is dropped);
- limits on the request line (414) and on the header block, in bytes and in lines (431), counted on the raw
  bytes before the parser keeps them (a 20 MB header was answered 200 before);
- a deadline for its body (408): a total time, and a minimum rate over each window of ``RATE_WINDOW_S``
  (a client holding a body one byte short, or sending it at 1 byte/s, kept its memory for good);
- a cap on open connections per worker (503 with Retry-After), which bounds the memory bodies may hold
  (connections x the body limit);
- a lossless drain: on shutdown a connection whose next request is not there yet is not closed at once
  (its request may be in the socket's buffer, and closing would reset it): it is answered if a request
  arrives within ``DRAIN_IDLE_S``, with ``Connection: close``, else closed.

Each refusal writes a short JSON response itself (the app never sees the request), closes the connection
and calls ``on_refuse(reason)`` for the metrics.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

try:  # the C parser: several times less CPU per request than h11 (the serve extra installs it)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: h11, pure Python
    HttpToolsProtocol = None

RATE_WINDOW_S = 5.0  # a body must arrive at --body-min-rate over each window of this many seconds
DRAIN_IDLE_S = 1.0  # on shutdown: how long a connection may take to deliver a request already on its way
MIN_JUDGED_WINDOW_S = 1.0  # a shorter window (an early timer) is not judged: its bytes count in the next one
CLOCK_SLACK_S = 0.001  # asyncio runs a timer up to its clock's resolution early
LINGER_S = 1.0  # after a refusal: read and drop what the client still sends, so that it reads the answer


@dataclass(frozen=True)
class EdgeLimits:
    """What one connection may cost: the ``mnist serve`` flags of the same names (ServeConfig declares their
    defaults and bounds)."""

    header_timeout: float  # seconds to send the request headers
    body_timeout: float  # seconds to send the whole body
    body_min_rate: int  # bytes/s, over each RATE_WINDOW_S (0: no minimum)
    max_connections: int  # open connections per worker
    max_url_bytes: int  # the request line
    max_header_bytes: int  # the whole header block
    max_headers: int  # header lines


def refusal(status: int, detail: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with a JSON body like the app's errors."""
    body = json.dumps({"detail": detail}).encode()
    extra = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            f"\r\nconnection: close\r\n{extra}\r\n").encode() + body


class Edge:
    """Mixed into a uvicorn HTTP protocol class (both keep the current request in ``self.cycle``)."""

    limits: EdgeLimits  # set per server by ``edge_protocol``
    on_refuse: Callable[[str], None] = staticmethod(lambda reason: None)

    def __init__(self, config: Config, server_state: ServerState, app_state: dict, _loop=None) -> None:  # noqa: ANN001
        super().__init__(config, server_state, app_state, _loop)
        self._timer: asyncio.TimerHandle | None = None  # the header deadline or the body's next check
        self._head_bytes = self._head_lines = self._line_bytes = 0  # of the request whose headers are arriving
        self._window_bytes = 0  # bytes received since the body's last rate check
        self._body_started = self._window_started = 0.0  # loop.time() of the body's start, the window's
        self._refused = self._draining = False

    # -- where the connection is ------------------------------------------------------------------------
    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _receiving_body(self) -> bool:
        return self.cycle is not None and self.cycle.more_body and not self.cycle.response_started

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- refusals -----------------------------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, detail: str, retry_after: int | None = None) -> None:
        """Answer ``status`` and close, draining what the client still sends for LINGER_S (so the answer is
        read, not lost to a reset)."""
        self._cancel()
        self._refused = True
        self.on_refuse(reason)
        if self.transport.is_closing():
            return
        self.transport.write(refusal(status, detail, retry_after))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _check_head(self, data: bytes) -> bool:
        """Count the header block's bytes and lines (up to its end, if it is in ``data``); refuse it when it
        is over a limit. True when the connection was refused."""
        end = data.find(b"\r\n\r\n")
        head = data if end < 0 else data[:end]
        if self._head_lines == 0:  # the request line is still arriving
            line_end = head.find(b"\n")
            self._line_bytes += len(head) if line_end < 0 else line_end
        self._head_bytes += len(head)
        self._head_lines += head.count(b"\n")
        lim = self.limits
        if self._line_bytes > lim.max_url_bytes:
            self._refuse(414, "url_too_long", f"the request line is longer than {lim.max_url_bytes} bytes")
        elif self._head_bytes > lim.max_header_bytes or self._head_lines > lim.max_headers:
            self._refuse(431, "headers_too_large", f"the request headers are over {lim.max_header_bytes} bytes "
                                                   f"or {lim.max_headers} lines")
        return self._refused

    # -- timers -------------------------------------------------------------------------------------------
    def _arm_header_deadline(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.limits.header_timeout, self._header_expired)

    def _header_expired(self) -> None:
        self._timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.on_refuse("header_timeout")
            self.transport.close()  # nothing was asked, so nothing is answered (as before)

    def _start_body_clock(self) -> None:
        # on the event loop's clock, the one its timers keep, with absolute deadlines: a delay recomputed from a
        # difference can land a hair before the deadline and arm a window of ~0 s (408 "too slow" at 12.0 s for
        # a body arriving at 4x the minimum rate, "over 0.0 s": make test on a Zen 4 VM)
        self._body_started = self._window_started = self.loop.time()
        self._window_bytes = 0
        self._timer = self.loop.call_at(self._next_check(), self._check_body)

    def _next_check(self) -> float:
        return min(self._window_started + RATE_WINDOW_S, self._body_started + self.limits.body_timeout)

    def _check_body(self) -> None:
        self._timer = None
        if not self._receiving_body() or self.transport.is_closing():
            return
        lim, now = self.limits, self.loop.time()
        if now >= self._body_started + lim.body_timeout - CLOCK_SLACK_S:
            return self._refuse(408, "body_timeout", f"the request body took longer than {lim.body_timeout:g} s")
        # reading paused: the app has not taken the bytes already here, which is not the client's fault. The
        # rate is judged over the window as it really was (s): a timer may fire late
        window = now - self._window_started
        if window >= MIN_JUDGED_WINDOW_S:
            if not self.flow.read_paused and self._window_bytes < lim.body_min_rate * window:
                return self._refuse(408, "body_too_slow", f"the request body arrived at under {lim.body_min_rate} "
                                                          f"bytes/s over {window:.1f} s")
            self._window_bytes, self._window_started = 0, now
        self._timer = self.loop.call_at(self._next_check(), self._check_body)

    # -- uvicorn's callbacks --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.server_state.connections) > self.limits.max_connections:
            return self._refuse(503, "too_many_connections", "the server has too many open connections; "
                                                             "try again shortly", retry_after=1)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped while the refusal lingers
        waiting = self._waiting_for_headers()
        if waiting and self._check_head(data):
            return
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm_header_deadline()  # a new request has started to arrive (or its headers are incomplete)
            return
        if self._draining:
            self.cycle.keep_alive = False  # answered, then closed: the server is stopping
        if waiting:  # this data completed a request's headers
            self._cancel()
            self._head_bytes = self._head_lines = self._line_bytes = 0
            if self._receiving_body():
                self._start_body_clock()
        elif not self._receiving_body():
            self._cancel()  # the body is complete: its clock stops
        self._window_bytes += len(data)

    def shutdown(self) -> None:
        """The server is stopping. A request that is being answered finishes (as in uvicorn); a connection
        waiting for one gets DRAIN_IDLE_S for it, since the client may have sent it already."""
        self._draining = True
        if not self._waiting_for_headers():
            self.cycle.keep_alive = False
            return
        if self._head_bytes == 0:  # no part of a request yet: it may be in the socket's buffer
            self._cancel()
            self._timer = self.loop.call_later(DRAIN_IDLE_S, self._drain_idle_expired)

    def _drain_idle_expired(self) -> None:
        self._timer = None
        if self._waiting_for_headers() and self._head_bytes == 0:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)


def edge_protocol(limits: EdgeLimits, on_refuse: Callable[[str], None] | None = None,
                  parser: str = "auto") -> type:
    """The protocol class for one server: ``parser`` "httptools", "h11" or "auto" (httptools where installed),
    with ``limits`` and the refusal counter."""
    base = HttpToolsProtocol if parser in ("auto", "httptools") and HttpToolsProtocol is not None else H11Protocol
    attrs = {"limits": limits, "on_refuse": staticmethod(on_refuse or (lambda reason: None))}
    return type(f"Edge{base.__name__}", (Edge, base), attrs)
