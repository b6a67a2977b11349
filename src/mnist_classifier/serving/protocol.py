"""uvicorn's HTTP/1.1 protocols (httptools where installed, else h11) with a deadline for request headers.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends its headers a
byte at a time (slowloris) is held open for as long as it likes. Here every connection waiting for a
request's headers is closed after ``header_timeout`` seconds.
"""

from __future__ import annotations

import asyncio

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

try:  # the C parser: several times less CPU per request than h11 (the serve extra installs it)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: h11, pure Python
    HttpToolsProtocol = None


class HeaderDeadline:
    """Mixed into a uvicorn HTTP protocol class (both keep the current request in ``self.cycle``)."""

    header_timeout = 10.0  # seconds; set per server by ``with_header_timeout``

    def __init__(self, config: Config, server_state: ServerState, app_state: dict, _loop=None) -> None:  # noqa: ANN001
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm()  # a new request has started to arrive (or its headers are still incomplete)
        else:
            self._disarm()  # headers complete: the request is being answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def with_header_timeout(seconds: float, parser: str = "auto") -> type:
    """The protocol class for one server: ``parser`` "httptools", "h11" or "auto" (httptools where installed),
    with its header deadline."""
    base = HttpToolsProtocol if parser in ("auto", "httptools") and HttpToolsProtocol is not None else H11Protocol
    return type(f"HeaderDeadline{base.__name__}", (HeaderDeadline, base), {"header_timeout": seconds})
