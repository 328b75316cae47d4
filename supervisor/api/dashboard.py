"""The web dashboard's static files (``/ui``), and which ``GET /`` a browser gets.

Why a module of its own: the dashboard is a static page (``supervisor/dashboard/``: HTML,
CSS and JavaScript shipped in the package, no build step, nothing from the network) that
reads ``/api/v1/status`` and ``/api/v1/events`` and steers through the lifecycle routes like
any other client. Nothing here renders data on the server, so these routes hold no data and
are served without the API key (``security.OPEN_ROUTES``): the page asks for the key and
sends it with every API call. The Host and Origin checks apply to them as to every route.

``GET /`` stays Ollama's plain-text liveness line (Ollama clients probe it): only a request
whose ``Accept`` prefers ``text/html`` to ``text/plain`` (a browser's) is sent on to ``/ui``
(:func:`prefers_html`).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from supervisor.api import schemas

routes = web.RouteTableDef()

UI_PATH = "/ui"
#: File name -> content type; ``/ui`` itself is ``index.html``.
_ASSETS = {
    "index.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
#: Every path this module serves (all of them open: see the module docstring).
PATHS = frozenset({UI_PATH, *(f"{UI_PATH}/{name}" for name in _ASSETS if name != "index.html")})

_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Only our own files run; the page talks to this server only; it cannot be framed.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


def _static(name: str, content_type: str) -> dict[str, Any]:
    return {"get": {
        "summary": f"The dashboard's {name} (static; no API key needed)",
        "responses": {"200": {"description": name, "content": {
            content_type: {"schema": {"type": "string"}}}}, **schemas.errors(("403",))},
    }}


OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    UI_PATH: _static("page", "text/html"),
    **{f"{UI_PATH}/{name}": _static(name, kind) for name, kind in _ASSETS.items()
       if name != "index.html"},
}


def _read(name: str) -> bytes:
    return resources.files("supervisor").joinpath("dashboard", name).read_bytes()


def _asset_handler(name: str) -> Any:
    content_type = _ASSETS[name]

    async def serve_asset(request: web.Request) -> web.Response:
        return web.Response(body=_read(name), content_type=content_type, charset="utf-8",
                            headers=_HEADERS)

    serve_asset.__name__ = f"serve_{name.replace('.', '_')}"
    return serve_asset


routes.get(UI_PATH)(_asset_handler("index.html"))
for _name in _ASSETS:
    if _name != "index.html":
        routes.get(f"{UI_PATH}/{_name}")(_asset_handler(_name))


def _quality(accept: str, wanted: str) -> float:
    """The q-value ``accept`` gives ``wanted`` (``type/subtype``): the most specific range
    that matches wins (``text/html`` over ``text/*`` over ``*/*``), as RFC 9110 says."""
    kind = wanted.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        specificity = {wanted: 2, f"{kind}/*": 1, "*/*": 0}.get(media)
        if specificity is None or specificity < best[0]:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        best = (specificity, q)
    return best[1]


def prefers_html(accept: str | None) -> bool:
    """Whether a request with this ``Accept`` header wants a page rather than the plain
    liveness line: browsers send ``text/html,...,*/*;q=0.8``; curl, Ollama's clients and
    probes send ``*/*`` or nothing, and keep getting the text."""
    if not accept:
        return False
    return _quality(accept, "text/html") > _quality(accept, "text/plain")
