"""Builds the aiohttp application: routes, the error and auth middlewares, manager lifetime.

The error middleware is the one place exceptions become responses: a ``LemonadeError`` gets
its status and OpenAI's error JSON; aiohttp's own HTTP errors (unknown route, wrong method,
body too large) get the same JSON shape; anything else is a bug, logged with its traceback
and answered 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from supervisor.api import admin, openai
from supervisor.api.keys import MANAGER, METRICS, SETTINGS, SHUTTING_DOWN, STARTED_AT
from supervisor.config import Settings, is_loopback_host
from supervisor.errors import LemonadeError, Unauthorized
from supervisor.manager import Manager
from supervisor.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Bodies are small JSON documents; audio uploads (later) get their own, larger limit.
MAX_BODY_BYTES = 1024 * 1024
#: Routes anyone on the bind address may call even when an API key is set.
OPEN_ROUTES = frozenset({"/health"})


def error_response(status: int, message: str, *, type_: str, code: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "code": code}},
        status=status, headers=headers,
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LemonadeError as e:
        headers = {}
        retry_after = e.retry_after_header()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(e.status, e.message, type_=e.type, code=e.code, headers=headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {
            404: f"no route for {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body is larger than the {MAX_BODY_BYTES} byte limit",
        }.get(e.status, e.reason)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(
            e.status, message, type_="invalid_request_error",
            code=code.get(e.status, "http_error"),
        )
    except Exception:
        log.exception("unhandled error in %s %s (this is a bug)", request.method, request.path)
        return error_response(500, "internal server error (this is a bug; see the server log)",
                              type_="server_error", code="internal_error")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def auth_middleware(api_key: str) -> Middleware:
    expected = _digest(api_key)

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_ROUTES:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.headers.get("x-api-key", "")
        # Digests of equal length, compared in constant time: no early exit leaks the key.
        if not hmac.compare_digest(_digest(given), expected):
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        return await handler(request)

    return check_key


class _Forbidden(LemonadeError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


def _hostname(host: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


@web.middleware
async def loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DESIGN "Security defaults" for a loopback bind: the Host header must name this machine
    (a DNS-rebinding page cannot talk to us under its own name), and a browser's ``Origin``,
    when sent, must be a loopback one (another site cannot drive the API: bodies are read
    whatever their content type, so a cross-site form POST needs no CORS preflight)."""
    host = _hostname(request.headers.get("Host", "127.0.0.1"))
    if not is_loopback_host(host):
        raise _Forbidden(f"Host '{host[:100]}' is not allowed: this server only answers to "
                         "localhost, 127.0.0.1 and [::1]")
    origin = request.headers.get("Origin")
    if origin is not None:
        try:
            origin_host = urllib.parse.urlsplit(origin).hostname
        except ValueError:  # e.g. "http://[oops"
            origin_host = None
        if origin_host is None or not is_loopback_host(origin_host):
            raise _Forbidden(f"cross-origin request from '{origin[:100]}' refused: only "
                             "loopback origins may use this server")
    return await handler(request)


def create_app(settings: Settings, *, runtime_base: str | None = None) -> web.Application:
    middlewares: list[Any] = [errors_middleware]
    if is_loopback_host(settings.host):
        middlewares.append(loopback_only)
    if settings.api_key:
        middlewares.append(auth_middleware(settings.api_key))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    manager = Manager(settings, runtime_base=runtime_base)
    app[SETTINGS] = settings
    app[MANAGER] = manager
    app[METRICS] = Metrics(manager)
    app[STARTED_AT] = time.time()
    app[SHUTTING_DOWN] = asyncio.Event()
    app.add_routes(openai.routes)
    app.add_routes(admin.routes)

    async def manager_lifetime(app: web.Application) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.close()

    async def end_event_streams(app: web.Application) -> None:
        app[SHUTTING_DOWN].set()

    app.on_shutdown.append(end_event_streams)
    app.cleanup_ctx.append(manager_lifetime)
    return app
