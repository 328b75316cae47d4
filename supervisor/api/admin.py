"""Lifecycle routes (``/api/v1/...``, Lemonade-shaped), metrics, health.

Ollama's ``/api/ps`` lives with Ollama's other routes in :mod:`supervisor.api.ollama`.

These let a user see and steer what is resident: load and pin, unload one or all, change idle
timeouts at runtime, watch lifecycle events as they happen, and scrape Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from supervisor import __version__
from supervisor.api import schemas
from supervisor.api.body import Body, parse_json_object
from supervisor.api.keys import MANAGER, METRICS, SHUTTING_DOWN, STARTED_AT
from supervisor.errors import BadRequest
from supervisor.lifecycle import State
from supervisor.liveness import stalls
from supervisor.status import device_rows, iso_time, model_rows

routes = web.RouteTableDef()

_TEXT = {"schema": {"type": "string"}}

_health = schemas.operation("Loaded models, and whether anything is stuck (Lemonade)",
                            ok=schemas.json_response("LemonadeHealth"))
_health["responses"]["503"] = schemas.json_response(
    "LemonadeHealth", "unhealthy: a load without progress, a stop past every deadline, or "
                      "the heartbeat gone (the problems say which)")

#: This module's routes for GET /openapi.json (see supervisor/api/openapi.py); the request
#: schemas are the ones the handlers check bodies with (supervisor/api/schemas.py).
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/health": {"get": schemas.operation("Liveness (no API key needed)",
                                         ok=schemas.json_response("Health"))},
    "/api/v1/health": {"get": _health},
    "/api/v1/status": {"get": schemas.operation(
        "Every model: state, pid, memory, idle timeout", ok=schemas.json_response("Status"))},
    "/api/v1/load": {"post": schemas.operation(
        "Load (and optionally pin) a model; answers when it is ready",
        request="LoadRequest", ok=schemas.json_response("LoadResult"),
        error_statuses=schemas.MODEL_ROUTE)},
    "/api/v1/unload": {"post": schemas.operation(
        "Unload one model, or all without model_name", request="UnloadRequest",
        request_required=False, ok=schemas.json_response("UnloadResult"),
        error_statuses=(*schemas.BODY_ROUTE, "404", "409", "503", "504"))},
    "/api/v1/pin": {"post": schemas.operation(
        "Pin a model (never evicted, no idle timer) or unpin it; loads nothing",
        request="PinRequest", ok=schemas.json_response("PinResult"),
        error_statuses=(*schemas.BODY_ROUTE, "404"))},
    "/api/v1/timeout": {"post": schemas.operation(
        "Set the idle timeout of one model or of all", request="TimeoutRequest",
        ok=schemas.json_response("TimeoutResult"),
        error_statuses=(*schemas.BODY_ROUTE, "404"))},
    "/api/v1/events": {"get": schemas.operation(
        "Lifecycle events (server-sent events)",
        ok={"description": "an endless event stream",
            "content": {"text/event-stream": schemas.sse_events()}})},
    "/metrics": {"get": schemas.operation(
        "Prometheus metrics", ok={"description": "Prometheus text format",
                                  "content": {"text/plain": _TEXT}})},
}

_SSE_KEEPALIVE_S = 15.0
#: A load names a configured model; it never brings its own recipe, file or command.
_LOAD_REFUSED_FIELDS = ("recipe", "path", "cmd", "command", "args", "options", "checkpoint")


def _seconds_or_never(value: float) -> float | None:
    return None if math.isinf(value) else value


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/api/v1/health")
async def api_health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    loaded = [
        {"model_name": s.name, "type": s.recipe.type, "pid": s.pid, "device": s.device}
        for s in manager.slots.values() if s.state is State.READY
    ]
    # Unhealthy (503) when a load or stop is stuck past every deadline (liveness.py).
    problems = stalls(manager)
    return web.json_response({
        "status": "unhealthy" if problems else "ok",
        "version": __version__,
        "model_loaded": loaded[0]["model_name"] if len(loaded) == 1 else None,
        "all_models_loaded": loaded,
        "problems": problems,
    }, status=503 if problems else 200)


@routes.get("/api/v1/status")
async def status(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    settings = manager.settings
    global_timeout = (
        manager.runtime_global_idle_timeout_s
        if manager.runtime_global_idle_timeout_s is not None
        else settings.auto_unload_timer_s
    )
    global_source = (
        "runtime" if manager.runtime_global_idle_timeout_s is not None
        else settings.sources.get("auto_unload_timer_s", "default")
    )
    return web.json_response({
        "server": {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - request.app[STARTED_AT], 3),
            # The server's clock, so a client counts down to expires_at without trusting its own.
            "time": iso_time(time.time()),
            "auto_unload_timer_s": _seconds_or_never(global_timeout),
            "auto_unload_timer_source": global_source,
            "max_loaded_models": settings.max_loaded_models,
            "max_loaded_per_type": dict(settings.max_loaded_per_type),
            "memory_budget_bytes": manager.memory_budget_bytes,
            "spawns": manager.spawns,
            "zygote_idle_timeout_s": _seconds_or_never(settings.zygote_idle_timeout_s),
            "zygotes": manager.zygotes.describe() if manager.zygotes is not None else [],
        },
        "models": model_rows(manager),  # first: it refreshes what device_rows adds up
        "devices": device_rows(manager),
        # The Ray cluster's nodes (their devices' budgets are in "devices"); null on one machine.
        "cluster": manager.cluster.describe() if manager.cluster is not None else None,
        # The last lifecycle events, so a client that connects late (the dashboard) can show
        # what happened before it listened.
        "recent_events": manager.events.recent(),
    })


@routes.post("/api/v1/load")
async def load(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    raw = parse_json_object(await request.read())
    for field in _LOAD_REFUSED_FIELDS:
        if field in raw:
            raise BadRequest(f"'{field}' is not accepted: models are loaded by name, from the "
                             f"configured recipes only")
    schemas.check("LoadRequest", raw)
    body = Body(raw)
    name = body.model_name("model_name")
    assert name is not None
    pinned = body.boolean("pinned", default=False) if body.has("pinned") else None
    idle_timeout = body.idle_timeout("idle_timeout", required=False)
    slot = await manager.load(name, pinned=pinned, idle_timeout_s=idle_timeout)
    return web.json_response({
        "status": "success",
        "model_name": name,
        "state": slot.state.value,
        "pid": slot.pid,
        "load_seconds": slot.load_seconds,
        "pinned": slot.pinned,
    })


@routes.post("/api/v1/unload")
async def unload(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "UnloadRequest", allow_empty=True)
    name = body.model_name("model_name", required=False)
    force = body.boolean("force", default=False)
    if name is None:
        unloaded = await manager.unload_all(force=force)
        return web.json_response({"status": "success", "unloaded": unloaded})
    was_loaded = await manager.unload(name, force=force)
    return web.json_response({
        "status": "success",
        "model_name": name,
        "unloaded": [name] if was_loaded else [],
        "message": None if was_loaded else f"model '{name}' was not loaded",
    })


@routes.post("/api/v1/pin")
async def pin(request: web.Request) -> web.Response:
    """Pin or unpin without loading: a pinned model is never a victim and has no idle timer;
    unpinning a ready, idle model starts its timer now."""
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "PinRequest")
    name = body.model_name("model_name")
    assert name is not None
    pinned = body.boolean("pinned", default=False)  # required by the schema
    slot = manager.slot(name)  # 404 for a name that is not configured
    slot.pinned_override = pinned
    manager.became_idle(slot)  # cancels the timer when pinned, arms it when not (if idle)
    return web.json_response({"status": "success", "model_name": name,
                              "pinned": slot.pinned, "state": slot.state.value})


@routes.post("/api/v1/timeout")
async def set_timeout(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "TimeoutRequest")
    name = body.model_name("model_name", required=False)
    seconds = body.idle_timeout("idle_timeout", required=True)
    assert seconds is not None
    manager.set_idle_timeout(name, seconds)
    return web.json_response({
        "status": "success",
        "model_name": name,
        "idle_timeout_s": _seconds_or_never(seconds),
    })


@routes.get("/api/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    stopping = request.app[SHUTTING_DOWN]
    async with manager.events.subscribe() as queue:
        await response.write(b": connected\n\n")
        while not stopping.is_set():
            # Wait for an event, the keep-alive interval, or the server shutting down: a
            # stream that only waited for events would hold up shutdown until aiohttp's
            # timeouts ran out (20 s and more).
            get = asyncio.ensure_future(queue.get())
            stop = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait((get, stop), timeout=_SSE_KEEPALIVE_S,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                get.cancel()  # no-op when done; a cancelled get() loses no event
            if not get.done() or get.cancelled():
                if not stopping.is_set():
                    await response.write(b": keep-alive\n\n")
                continue
            event = get.result()
            dropped = manager.events.take_dropped(queue)
            if dropped:  # this client fell behind: say how many events it missed
                note = json.dumps({"event": "dropped", "count": dropped})
                await response.write(f"event: dropped\ndata: {note}\n\n".encode())
            payload = json.dumps(event, separators=(",", ":"))
            await response.write(f"event: {event['event']}\ndata: {payload}\n\n".encode())
    await response.write_eof()
    return response


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
