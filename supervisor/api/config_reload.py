"""``POST /api/v1/reload``: re-read the config files and apply the difference (reload.py).

The server keeps the function that built its settings (the same flags and environment it
started with), so a reload reads exactly what a restart would, without one. An invalid file
is a 400 whose message names the file and key, and nothing changes. ``SIGHUP`` and
``lemonade reload`` come here too (``server.py``, ``cli.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from supervisor import reload
from supervisor.api import schemas
from supervisor.api.keys import MANAGER, RELOADER
from supervisor.config import Settings
from supervisor.config_values import ConfigError
from supervisor.errors import BadRequest
from supervisor.manager import Manager

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_REPORT = schemas.json_response("ReloadReport", "what changed")
_REPORT["content"]["application/json"]["schema"] = {
    "type": "object",
    "properties": {
        **{key: {"type": "array", "items": {"type": "string"}}
           for key in ("added", "removed", "changed", "reload_when_idle",
                       "server_settings_applied", "restart_needed")},
        "config": {"type": "string", "nullable": True},
    },
    "required": ["added", "removed", "changed", "reload_when_idle",
                 "server_settings_applied", "restart_needed"],
}
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/v1/reload": {"post": schemas.operation(
        "Re-read the config files and apply the difference without a restart",
        request="EmptyRequest", request_required=False, ok=_REPORT,
        error_statuses=schemas.BODY_ROUTE)},
}


def reload_now(manager: Manager, reloader: Callable[[], Settings]) -> dict[str, Any]:
    """Read and apply; ``BadRequest`` (naming file and key) when the new config is invalid."""
    try:
        new = reloader()
        return reload.apply(manager, new)
    except ConfigError as e:
        log.error("config reload refused, nothing changed: %s", e)
        raise BadRequest(f"config reload refused, nothing changed: {e}",
                         code="invalid_config") from None


@routes.post("/api/v1/reload")
async def reload_config(request: web.Request) -> web.Response:
    body = (await schemas.read_valid_body(request, "EmptyRequest", allow_empty=True)).data
    if body:
        raise BadRequest(f"/api/v1/reload takes no fields; got {', '.join(sorted(body))}")
    # Reading the files and applying them happen in one step on the loop (no await between),
    # so two reloads cannot interleave and no request sees half a config.
    return web.json_response(reload_now(request.app[MANAGER], request.app[RELOADER]))
