"""Builds the aiohttp application: routes, middlewares, and the manager's lifetime.

The error middleware is the one place exceptions become responses: a ``LemonadeError`` gets
its status and OpenAI's error JSON; aiohttp's own HTTP errors (unknown route, wrong method,
body too large) get the same JSON shape; anything else is a bug, logged with its traceback
and answered 500.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from supervisor.api import (
    access_log,
    admin,
    chat,
    compat,
    config_reload,
    dashboard,
    embeddings,
    ollama,
    openai,
    transcriptions,
)
from supervisor.api.access_log import CLIENT_CLOSED_REQUEST
from supervisor.api.keys import MANAGER, METRICS, RELOADER, SETTINGS, SHUTTING_DOWN, STARTED_AT
from supervisor.api.openapi import routes as openapi_routes
from supervisor.api.security import add_cors_headers, auth_middleware, loopback_only
from supervisor.config import Settings, is_loopback_host, load_settings
from supervisor.errors import LemonadeError
from supervisor.manager import Manager
from supervisor.metrics import Metrics
from supervisor.slow_clients import body_deadline

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Bodies are small JSON documents; audio uploads (later) get their own, larger limit.
MAX_BODY_BYTES = 1024 * 1024


def error_response(status: int, message: str, *, type_: str, code: str,
                   headers: dict[str, str] | None = None,
                   param: str | None = None) -> web.Response:
    """OpenAI's error body: ``param`` is required there, null when no one field is at fault."""
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
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
        return error_response(e.status, e.message, type_=e.type, code=e.code, headers=headers,
                              param=e.param)
    except ConnectionResetError:
        # The client hung up while its answer was being written: there is nobody left to
        # answer and nothing is broken. 499 ("client closed request") only reaches the log.
        log.info("client went away during %s %s", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {
            404: f"no route for {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body is larger than the {MAX_BODY_BYTES} byte limit",
        }.get(e.status, e.reason)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        allow = None
        if isinstance(e, web.HTTPMethodNotAllowed):  # RFC 9110: a 405 says what is allowed
            methods = sorted(m for m in e.allowed_methods if m != "*")
            allow = {"Allow": ", ".join(methods)}
            message += f" (allowed: {', '.join(methods)})"
        return error_response(
            e.status, message, type_="invalid_request_error",
            code=code.get(e.status, "http_error"), headers=allow,
        )
    except Exception:
        log.exception("unhandled error in %s %s (this is a bug)", request.method, request.path)
        return error_response(500, "internal server error (this is a bug; see the server log)",
                              type_="server_error", code="internal_error")


def create_app(settings: Settings, *, runtime_base: str | None = None,
               reloader: Callable[[], Settings] | None = None) -> web.Application:
    """``reloader`` builds the settings again for a config reload (default: the same file)."""
    manager = Manager(settings, runtime_base=runtime_base)
    metrics = Metrics(manager)
    # The access log is outermost: it sees the status the inner middlewares answered with.
    middlewares: list[Any] = [
        access_log.access_middleware(metrics, log_lines=settings.access_log),
        ollama.ollama_errors_middleware,  # Ollama's error shape on Ollama's paths
        errors_middleware,
    ]
    if is_loopback_host(settings.host):
        middlewares.append(loopback_only)
    if settings.api_key:
        middlewares.append(auth_middleware(settings.api_key))
    middlewares.append(body_deadline(settings.body_timeout_s))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app[SETTINGS] = settings
    app[RELOADER] = reloader or functools.partial(
        load_settings, cli={"config": settings.config_path} if settings.config_path else {})
    app[MANAGER] = manager
    app[METRICS] = metrics
    access_log.install(app, manager)
    app[STARTED_AT] = time.time()
    app[SHUTTING_DOWN] = asyncio.Event()
    app.add_routes(openai.routes)
    app.add_routes(admin.routes)
    app.add_routes(embeddings.routes)
    app.add_routes(chat.routes)
    app.add_routes(compat.routes)
    app.add_routes(transcriptions.routes)
    app.add_routes(ollama.routes)
    app.add_routes(openapi_routes)
    app.add_routes(config_reload.routes)
    app.add_routes(dashboard.routes)

    async def manager_lifetime(app: web.Application) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.close()

    async def end_event_streams(app: web.Application) -> None:
        app[SHUTTING_DOWN].set()
        # New requests get 503 and loads in progress are cancelled, so a SIGTERM during a
        # long load does not wait for it.
        manager.begin_shutdown()

    app.on_shutdown.append(end_event_streams)
    app.on_response_prepare.append(add_cors_headers)
    app.cleanup_ctx.append(manager_lifetime)
    return app
