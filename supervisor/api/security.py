"""Who may talk to the server: the API key, the Host allowlist, and CORS for loopback origins.

* API key (optional; required for a non-loopback bind): ``Authorization: Bearer <key>`` or
  ``x-api-key``, compared in constant time over SHA-256 digests, on every route but
  ``/health`` and the dashboard's static files (:data:`OPEN_ROUTES`). The 401 is the same
  whether the key is missing or wrong.
* On a loopback bind the Host header must name this machine, so a DNS-rebinding page cannot
  reach us under its own name, and a browser's ``Origin``, when sent, must be a loopback one:
  bodies are read whatever their content type, so a cross-site form POST needs no preflight
  and must be refused here. Loopback origins get CORS headers (and preflight answers), so a
  local web UI on another port can use the API.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import urllib.parse
from collections.abc import Awaitable, Callable

from aiohttp import http_exceptions, web

from supervisor.api import dashboard
from supervisor.config import is_loopback_host
from supervisor.errors import Forbidden, Unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

#: Routes anyone on the bind address may call even when an API key is set: liveness, and the
#: dashboard's static files (they hold no data; the page asks for the key to read any).
OPEN_ROUTES = frozenset({"/health", *dashboard.PATHS})
_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_MAX_AGE_S = "600"
_CORS_KEY = "lemonade.cors"


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request (a 9 kB header, 200 headers, Content-Length with
    Transfer-Encoding) at ERROR with a traceback, so any client could flood our log with
    tracebacks. Such a request already got its 400; log it as one escaped INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, http_exceptions.HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "malformed HTTP request refused (%s): %s"
            record.args = (type(error).__name__, str(error.message)[:200].encode(
                "unicode_escape").decode())
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("aiohttp.server").addFilter(_ClientProtocolErrors())


def _digest(value: str) -> bytes:
    # Header values may hold any byte (aiohttp keeps undecodable ones as surrogates).
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def auth_middleware(api_key: str) -> Middleware:
    expected = _digest(api_key)

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_ROUTES or _is_preflight(request):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.headers.get("x-api-key", "")
        # Digests of equal length, compared in constant time: no early exit leaks the key.
        if not hmac.compare_digest(_digest(given), expected):
            raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")
        return await handler(request)

    return check_key


def _hostname(host: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_preflight(request: web.Request) -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def _origin_host(origin: str) -> str | None:
    """The host of a well-formed ``scheme://host[:port]`` origin, else None.

    An origin is exactly that: anything with user info, a path, a query or a fragment
    (``http://user@localhost``, ``http://localhost?x``), ``null`` or an unknown scheme is
    malformed and treated as not allowed.
    """
    try:
        parts = urllib.parse.urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:  # e.g. "http://[oops"
        return None
    if (parts.scheme not in ("http", "https") or parts.username is not None
            or parts.password is not None or parts.path not in ("", "/") or parts.query
            or parts.fragment or "?" in origin or "#" in origin or "@" in origin):
        return None
    return parts.hostname


@web.middleware
async def loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = _hostname(request.headers.get("Host", "127.0.0.1"))
    if not is_loopback_host(host):
        raise Forbidden(f"Host '{host[:100]}' is not allowed: this server only answers to "
                        "localhost, 127.0.0.1 and [::1]")
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    origin_host = _origin_host(origin)
    if origin_host is None or not is_loopback_host(origin_host):
        raise Forbidden(f"cross-origin request from '{origin[:100]}' refused: only "
                        "loopback origins may use this server")
    cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if _is_preflight(request):
        wanted = request.headers.get("Access-Control-Request-Headers", "")
        # Echo only well-formed header names, never raw input.
        names = [h.strip() for h in wanted.split(",") if h.strip().replace("-", "").isalnum()]
        return web.Response(status=204, headers={
            **cors,
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Allow-Headers": ", ".join(names[:20]),
            "Access-Control-Max-Age": _CORS_MAX_AGE_S,
        })
    request[_CORS_KEY] = cors  # added by add_cors_headers to whatever answer goes out
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: error responses made by outer middlewares get them too."""
    cors = request.get(_CORS_KEY)
    if cors:
        response.headers.update(cors)
