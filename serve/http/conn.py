"""HTTP connection hygiene under uvicorn: slow or idle clients cannot hold the server's connections.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not a client that trickles
its request headers, and its ``limit_concurrency`` answers 503 only once a request's headers are in:
3,000 connections sending a header byte a second stay open indefinitely and starve everyone else of
file descriptors. `GuardedH11Protocol` adds, per connection:

* a header deadline: the request line and headers of each request must arrive within
  ``http.header_timeout_s`` of the connection opening (or of the previous response ending); else the
  connection is closed;
* a connection cap: past ``http.max_connections`` open connections a new one is closed at once,
  before it can hold anything.

The body deadline (``http.body_timeout_s``) is the app's (serve.http reads the body under a timeout
and answers 408). Each cut is counted in ``sensepack_http_connections_cut_total{reason}`` and logged
at INFO: these are clients' doing, never server errors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("sensepack.http")

HEADER_TIMEOUT, OVER_LIMIT, BODY_TIMEOUT, DISCONNECT = "header_timeout", "over_limit", "body_timeout", "disconnect"


def guarded_protocol(header_timeout: float, max_connections: int, on_cut) -> type[H11Protocol]:
    """An H11Protocol class with these limits; `on_cut(reason)` counts each cut connection."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                on_cut(OVER_LIMIT)
                log.info("connection refused: http.max_connections reached", extra={"event": "http_cut"})
                self.transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                on_cut(HEADER_TIMEOUT)
                log.info("connection closed: request headers too slow", extra={"event": "http_cut"})
                self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers are complete: the app takes over
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own header deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
