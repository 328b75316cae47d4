"""Routes of the systems this project grew from, acting on ``[server] default_model``.

Scripts and dashboards written for Kokoro-FastAPI (``POST /dev/unload``) and for TorchTS
(``/model/status``, ``/model/unload``, ``/model/timeout``) keep working unchanged: each route
maps onto the same manager operations as the ``/api/v1`` ones, so an unload here is a real
process exit through ``retire`` and a timeout set here is the model's runtime idle timeout.
Response fields are the ones those projects document.
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from supervisor.api import schemas
from supervisor.api.keys import MANAGER
from supervisor.errors import BadRequest, ServiceUnavailable
from supervisor.lifecycle import Slot, State
from supervisor.manager import Manager

routes = web.RouteTableDef()

#: TorchTS refuses timeouts under a minute; so do we on its route.
MIN_TIMEOUT_S = 60
#: Kokoro's language codes (TorchTS reports them as ``available_languages``).
KOKORO_LANGUAGES = ("a", "b", "e", "f", "h", "i", "j", "p", "z")
#: What the default model's absence or a server not up yet answers on every route here.
_ERRORS = (*schemas.BODY_ROUTE, "404", "409", "503", "504")

#: This module's routes for GET /openapi.json; the bodies are checked against these schemas.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/dev/unload": {"post": schemas.operation(
        "Kokoro-FastAPI: unload the default model now", request="EmptyRequest",
        request_required=False, ok=schemas.json_response("KokoroUnloaded"),
        error_statuses=_ERRORS)},
    "/model/status": {"get": schemas.operation(
        "TorchTS: the default model's state", ok=schemas.json_response("TorchTSStatus"),
        error_statuses=(*schemas.ANY_ROUTE, "404", "503"))},
    "/model/unload": {"post": schemas.operation(
        "TorchTS: unload the default model now", request="EmptyRequest",
        request_required=False, ok=schemas.json_response("Message"), error_statuses=_ERRORS)},
    "/model/timeout": {"post": schemas.operation(
        "TorchTS: set the default model's idle timeout (at least 60 s)",
        request="ModelTimeoutRequest", ok=schemas.json_response("Message"),
        error_statuses=_ERRORS)},
}


def _default_slot(manager: Manager) -> Slot:
    if manager.runtime_dir is None or manager.closed:
        raise ServiceUnavailable("the server is not initialised (starting or shutting down)",
                                 retry_after_s=1)
    name = manager.settings.default_model
    if name is None:
        raise ServiceUnavailable(
            "no default model is configured for this route: set [server] default_model "
            "(or --default-model / LEMONADE_DEFAULT_MODEL)",
            code="no_default_model",
        )
    return manager.slot(name)


@routes.post("/dev/unload")
async def dev_unload(request: web.Request) -> web.Response:
    """Kokoro-FastAPI: release the model's memory now; the next request reloads it."""
    manager = request.app[MANAGER]
    await schemas.read_valid_body(request, "EmptyRequest", allow_empty=True)
    slot = _default_slot(manager)
    await manager.unload(slot.name)
    return web.json_response({"status": "unloaded"})


@routes.get("/model/status")
async def model_status(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    slot = _default_slot(manager)
    manager.refresh_memory()
    timeout = manager.effective_idle_timeout(slot)
    idle_for = None if slot.last_used is None else max(0.0, time.time() - slot.last_used)
    loaded = slot.state is State.READY
    return web.json_response({
        "model": slot.name,
        "model_loaded": loaded,
        "device": (slot.device or slot.recipe.device) if loaded else None,
        "unload_timeout": None if math.isinf(timeout.seconds) else timeout.seconds,
        "time_since_last_activity": None if idle_for is None else round(idle_for, 1),
        "is_loading": slot.state is State.LOADING,
        "available_languages": list(KOKORO_LANGUAGES) if slot.recipe.kind.startswith("kokoro")
        else [],
        # Per process, as the driver counts it: 0 when the worker is gone.
        "gpu_memory_allocated": slot.vram_bytes if loaded else 0,
        "gpu_memory_reserved": slot.vram_bytes if loaded else 0,
        "memory_rss_bytes": slot.rss_bytes if loaded else 0,
    })


@routes.post("/model/unload")
async def model_unload(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    await schemas.read_valid_body(request, "EmptyRequest", allow_empty=True)
    slot = _default_slot(manager)
    await manager.unload(slot.name)
    return web.json_response({"message": "Model unloaded successfully"})


@routes.post("/model/timeout")
async def model_timeout(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "ModelTimeoutRequest")
    slot = _default_slot(manager)
    if not body.has("timeout_seconds"):
        raise BadRequest("'timeout_seconds' is required (seconds, at least 60)")
    seconds = body.number("timeout_seconds", default=0, low=MIN_TIMEOUT_S, high=365 * 86400)
    manager.set_idle_timeout(slot.name, seconds)
    return web.json_response({"message": f"Timeout updated to {seconds:g} seconds"})
