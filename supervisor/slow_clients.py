"""Bounds on slow and greedy clients at the connection level: slowloris and connection floods.

aiohttp has no deadline for a request's header block: a client that opens connections and
sends a header byte every few seconds holds each one for as long as it likes (aiohttp's
keep-alive timer is not running while bytes arrive). This module puts a thin protocol in
front of aiohttp's per-connection handler (:class:`GuardedRunner` hands it to the listening
socket):

* **header deadline**: a request's whole header block (up to the blank line) must arrive
  within ``header_timeout`` of the connection opening, or, on a kept-alive connection, of the
  next request's first byte; else the connection is closed. An idle kept-alive connection is
  aiohttp's, whose keep-alive timer closes it; a request body that dribbles is bounded by
  ``body_timeout`` (:func:`body_deadline`). The end of one request is known from its
  response being prepared (:func:`response_prepared`, an ``on_response_prepare`` signal);
* **connection cap**: at ``max_connections`` open connections, a new one first takes the
  place of the oldest connection that has not finished its first header block (the likely
  slowloris: measured with ``bench/slow_clients.py``, refusing newcomers instead let 300
  dribbling connections starve a normal client of 80% of its requests); only when every
  connection is past its headers does a newcomer get a plain ``503`` with ``Retry-After``,
  before aiohttp spends anything on it.

Everything else passes straight through to aiohttp's handler, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from supervisor.errors import RequestTimeout

log = logging.getLogger(__name__)

_FULL_BODY = (b'{"error": {"message": "too many open connections; try again shortly", '
              b'"type": "server_error", "param": null, "code": "too_many_connections"}}')
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
         b"Content-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n" % len(_FULL_BODY)) + _FULL_BODY


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_deadline(timeout_s: float) -> Any:
    """Middleware: a JSON or form body must arrive within ``timeout_s`` (else 408).

    The body is read here, once (aiohttp keeps it for the handler's own ``read()``), so no
    route can be held by a client that dribbles its body. Multipart uploads (transcriptions,
    up to 25 MB) are read by their route part by part and are not pre-read here.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.can_read_body and not request.content_type.startswith("multipart/"):
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within body_timeout ({timeout_s:g}s)"
                ) from None
        return await handler(request)

    return middleware


#: The connection guards of the runner serving an app (see :class:`GuardedRunner`).
GUARDS: web.AppKey[list[ConnectionGuard]] = web.AppKey("connection_guards")


class GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's handler; closes a connection whose headers dawdle."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: Any = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, to find "\r\n\r\n" across reads
        self._headers_done = False
        self._next_request = False
        self._refused = False

    def connection_made(self, transport: Any) -> None:
        # Any: uvloop's transports are not subclasses of asyncio.Transport.
        self.transport = transport
        self.guard.by_transport[transport] = self
        if not self.guard.admit(self):
            self._refused = True
            transport.write(_FULL)
            transport.close()
            return
        self._deadline = asyncio.get_running_loop().call_later(
            self.guard.header_timeout_s, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._headers_done and self.transport is not None:
            self.guard.cut += 1
            log.info("closed a connection that sent no complete request header within %gs",
                     self.guard.header_timeout_s)
            self.transport.close()

    def make_room(self) -> None:
        """Closed to let a newcomer in: this connection never finished its headers."""
        self.guard.cut += 1
        if self.transport is not None:
            self.transport.close()

    def answered(self) -> None:
        """This connection's request has its response: the next bytes begin a new request."""
        if self._headers_done:
            self._headers_done = False
            self._tail = b""
            self._next_request = True  # the deadline starts with the next request's first byte

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._next_request and data:
            self._next_request = False
            self.guard.stalled[self] = None
            self._deadline = asyncio.get_running_loop().call_later(
                self.guard.header_timeout_s, self._too_slow)
        if not self._headers_done:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._headers_done = True
                self.guard.stalled.pop(self, None)
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None
            else:
                self._tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.by_transport.pop(self.transport, None)
        if self._refused:
            return
        self.guard.release(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """The protocol factory the listening socket uses: aiohttp's, wrapped."""

    def __init__(self, server: web.Server, *, header_timeout_s: float,
                 max_connections: int | None) -> None:
        self.server = server
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self.cut = 0
        #: Connections still waiting for a request's header block, oldest first.
        self.stalled: dict[GuardedProtocol, None] = {}
        #: Which protocol a request's transport belongs to (for :func:`response_prepared`).
        self.by_transport: dict[Any, GuardedProtocol] = {}

    def admit(self, protocol: GuardedProtocol) -> bool:
        if self.max_connections is not None and self.open >= self.max_connections:
            oldest = next(iter(self.stalled), None)
            if oldest is None:
                self.refused += 1
                return False
            del self.stalled[oldest]
            oldest.make_room()  # its connection_lost comes later and releases its count
        self.open += 1
        self.stalled[protocol] = None
        return True

    def release(self, protocol: GuardedProtocol) -> None:
        self.open -= 1
        self.stalled.pop(protocol, None)

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self.server(), self)

    def __getattr__(self, name: str) -> Any:  # anything else a site asks of the server
        return getattr(self.server, name)


async def response_prepared(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the request on this connection is answered (server.py)."""
    if request.transport is None:
        return
    for guard in request.app.get(GUARDS, ()):
        protocol = guard.by_transport.get(request.transport)
        if protocol is not None:
            protocol.answered()


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose sites listen through a :class:`ConnectionGuard`."""

    __slots__ = ("_guard", "_guard_args", "_guards")

    def __init__(self, app: web.Application, *, header_timeout_s: float,
                 max_connections: int | None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard: ConnectionGuard | None = None
        self._guard_args = (header_timeout_s, max_connections)
        # The app reaches its guards (made when the server is) through this list, filled
        # later: the app is frozen by then, the list is not.
        self._guards: list[ConnectionGuard] = []
        app[GUARDS] = self._guards
        app.on_response_prepare.append(response_prepared)

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return None
        if self._guard is None or self._guard.server is not inner:
            header_timeout_s, max_connections = self._guard_args
            self._guard = ConnectionGuard(inner, header_timeout_s=header_timeout_s,
                                          max_connections=max_connections)
            self._guards.append(self._guard)
        return self._guard

    @property
    def guard(self) -> ConnectionGuard | None:
        return self._guard
