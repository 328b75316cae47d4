"""One access-log line and the request metrics for every HTTP request, from one middleware.

aiohttp's own access logger is switched off (``server.py``): it never sees a request whose
handler was cancelled because the client hung up, it knows nothing of models, and it only
exists where our runner is used. This middleware is the outermost one, so it sees the final
status of everything the error, Host and API-key middlewares answer, and it sends a plain
response itself before writing the line, so the duration and size are those of the response
really sent. A streamed response is written by its handler, so the line comes when the
stream ends. A request whose client went away is logged as 499 (nginx's "client closed
request"), whether that showed as a cancelled handler or as a stream that never ended.

The line: ``POST /v1/chat/completions model=smol 200 1.234s 5120B``: method, path (no query
string, percent-encoded as it came, escaped, cut at 200 characters), the model the request
got hold of (known when the manager admitted it; a request refused before that, e.g. a 404
for a model nobody configured, has none), status, seconds, and the bytes aiohttp wrote for
the response (status line and headers included; ``-`` when the response never ended).
Bodies, query strings and headers (so API keys) are never logged.

Polling routes (``/health``, ``/metrics``, ``/api/v1/status``) are logged like the rest: a
user reading the log expects every request there, and a poller's line also shows that it
runs. ``--no-access-log`` (or ``[server] access_log = false``) turns all lines off; the
metrics stay.

Which request a callback belongs to travels in a context variable set for the handler's
task, so the manager's ``on_admitted`` callback (which runs inside the handler's ``await``)
can note the model without the manager knowing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from supervisor.manager import Manager
from supervisor.metrics import Metrics

log = logging.getLogger("supervisor.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

#: nginx's status for a request whose client closed the connection first.
CLIENT_CLOSED_REQUEST = 499
#: Longest path written to a line; the rest of a long one says nothing a reader needs.
MAX_LOGGED_PATH = 200
#: The metrics label of a request that matched no route (404, 405): never its raw path.
UNMATCHED_ROUTE = "unmatched"


@dataclass
class RequestRecord:
    """What is learned about one request while it runs (loop times, in seconds)."""

    started_at: float
    model: str | None = None
    first_byte_at: float | None = None
    first_token_at: float | None = None
    #: Set when the handler has returned: a prepare after that is ours, not a stream's.
    handler_done: bool = False
    finished: bool = False


_RECORD = web.RequestKey("lemonade_request_record", RequestRecord)
_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "lemonade_request_record", default=None
)


def note_first_token(request: web.Request) -> None:
    """A chat or completion stream got its first text from the worker."""
    record = request.get(_RECORD)
    if record is not None and record.first_token_at is None:
        record.first_token_at = asyncio.get_running_loop().time()


def _note_admitted(model: str, waited_s: float) -> None:
    # Runs in the task that called ensure_ready(). A task a request started (a load) copies
    # the request's context, hence the ``finished`` check for whatever it does later.
    record = _CURRENT.get()
    if record is not None and not record.finished and record.model is None:
        record.model = model


async def _stamp_first_byte(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the moment a handler sends a stream's status and headers."""
    record = request.get(_RECORD)
    if record is not None and not record.handler_done and record.first_byte_at is None:
        record.first_byte_at = asyncio.get_running_loop().time()


def install(app: web.Application, manager: Manager) -> None:
    """Hooks the record keeping needs besides the middleware itself."""
    app.on_response_prepare.append(_stamp_first_byte)
    manager.on_admitted.append(_note_admitted)


def access_middleware(metrics: Metrics, *, log_lines: bool) -> Middleware:
    """The outermost middleware: records every request, and logs it when ``log_lines``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        record = RequestRecord(started_at=loop.time())
        request[_RECORD] = record
        # One connection's requests share a task (keep-alive), so the variable is reset.
        token = _CURRENT.set(record)
        status = 500
        sent: int | None = None
        try:
            response = await handler(request)
            record.handler_done = True
            if not response.prepared:  # not a stream its handler wrote: send it now
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    status = CLIENT_CLOSED_REQUEST
                    return response  # aiohttp gives up on it as on any reset connection
            if response.body_length:  # set when the response ended (write_eof)
                status, sent = response.status, response.body_length
            elif request.transport is None:  # a stream whose client left before its end
                status = CLIENT_CLOSED_REQUEST
            else:
                status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST  # handler_cancellation: the client hung up
            raise
        except web.HTTPException as e:  # what the errors middleware lets through (< 400)
            status = e.status
            raise
        finally:
            record.finished = True
            _CURRENT.reset(token)
            _finish(request, record, metrics, log_lines, status=status, sent=sent,
                    now=loop.time())

    return middleware


def _finish(request: web.Request, record: RequestRecord, metrics: Metrics, log_lines: bool,
            *, status: int, sent: int | None, now: float) -> None:
    seconds = now - record.started_at
    model = record.model or ""
    first_byte = record.first_byte_at
    first_token = record.first_token_at
    metrics.observe_request(
        route=route_label(request), method=request.method, model=model, status=status,
        seconds=seconds,
        first_byte_s=None if first_byte is None else first_byte - record.started_at,
        first_token_s=None if first_token is None else first_token - record.started_at,
    )
    if log_lines:
        log.info("%s %s%s %d %.3fs %s", _printable(request.method, 16),
                 _printable(request.rel_url.raw_path, MAX_LOGGED_PATH),
                 f" model={model}" if model else "", status, seconds,
                 "-" if sent is None else f"{sent}B")


def route_label(request: web.Request) -> str:
    """The matched route's template (``/v1/models/{id}``), or ``unmatched``."""
    resource = request.match_info.route.resource
    return UNMATCHED_ROUTE if resource is None else resource.canonical


def _printable(text: str, limit: int) -> str:
    # A path may carry any character (%0a decodes to a newline; raw bytes arrive as
    # surrogates): escape them so one request is always one line that says what came.
    cut = text[:limit].encode("unicode_escape", "backslashreplace").decode("ascii")
    return cut + ("..." if len(text) > limit else "")
