"""``GET /openapi.json``: an OpenAPI 3.0 document of every route the server has.

The document is assembled when it is first asked for, from the routes actually registered
on the application, so it cannot describe a route that does not exist or miss one that does:

* every route module may define ``OPENAPI_PATHS``: a dict ``{path: {method: operation}}`` in
  OpenAPI 3.0 form (lower-case methods; ``$ref`` to ``#/components/schemas/Error`` and the
  shared ``#/components/responses/*`` below are available). The module of each registered
  handler is looked up and its ``OPENAPI_PATHS`` merged in;
* :data:`FALLBACK_PATHS` here describes routes whose modules do not (yet) document
  themselves; a module's own description wins;
* any registered route still undescribed gets a minimal entry (its method, the JSON error
  responses), so fuzzers and clients see it anyway.

Adding a route therefore needs nothing here: define ``OPENAPI_PATHS`` in its module.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from supervisor import __version__

routes = web.RouteTableDef()

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/openapi.json": {"get": {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.0 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
}


def _json_body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any] | None = None,
        media: str = "application/json") -> dict[str, Any]:
    return {"description": description,
            "content": {media: {"schema": schema or {"type": "object"}}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
    "404": {"$ref": "#/components/responses/NotFound"},
    "413": {"$ref": "#/components/responses/PayloadTooLarge"},
}
_MODEL_ERRORS = {
    **_ERRORS,
    "409": {"$ref": "#/components/responses/Conflict"},
    "429": {"$ref": "#/components/responses/TooManyRequests"},
    "502": {"$ref": "#/components/responses/WorkerFailed"},
    "503": {"$ref": "#/components/responses/Unavailable"},
    "504": {"$ref": "#/components/responses/Timeout"},
}
_MODEL_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}
_DURATION = {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "maxLength": 32}]}

#: Routes of modules that do not describe themselves yet (openai.py's two routes).
FALLBACK_PATHS: dict[str, dict[str, Any]] = {
    "/v1/models": {"get": {
        "summary": "List the configured models (OpenAI)",
        "responses": {"200": _ok("the model list"), **_ERRORS},
    }},
    "/v1/audio/speech": {"post": {
        "summary": "Text to speech (OpenAI)",
        "requestBody": _json_body({
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": _MODEL_NAME,
                "input": {"type": "string", "minLength": 1, "maxLength": 4096},
                "voice": {"type": "string", "maxLength": 256},
                "response_format": {"type": "string",
                                    "enum": ["wav", "pcm", "flac", "mp3", "opus", "aac"]},
                "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0},
                "stream": {"type": "boolean"},
                "keep_alive": _DURATION,
                "ttl": _DURATION,
            },
        }),
        "responses": {"200": _ok("audio", {"type": "string", "format": "binary"},
                                 "application/octet-stream"), **_MODEL_ERRORS},
    }},
}

_COMPONENTS: dict[str, Any] = {
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "code": {"type": "string"}},
            }},
        },
    },
    "responses": {
        name: {"description": text,
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for name, text in (
            ("BadRequest", "malformed or invalid request"),
            ("Unauthorized", "missing or wrong API key"),
            ("Forbidden", "Host or Origin not allowed"),
            ("NotFound", "unknown model or route"),
            ("Conflict", "pinned, protected, or can never fit"),
            ("PayloadTooLarge", "body over the limit"),
            ("TooManyRequests", "the model's max_queue is full (Retry-After)"),
            ("WorkerFailed", "the worker died or broke the protocol"),
            ("Unavailable", "load failed, busy, cooling down or shutting down (Retry-After)"),
            ("Timeout", "load or call took too long"),
        )
    },
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
}


def _module_paths(module_name: str) -> Mapping[str, Any]:
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return {}
    paths = getattr(module, "OPENAPI_PATHS", None)
    return paths if isinstance(paths, Mapping) else {}


def _undocumented(method: str, path: str) -> dict[str, Any]:
    """A registered route nobody described: any JSON object in, JSON errors out."""
    operation: dict[str, Any] = {
        "summary": f"{method.upper()} {path}",
        "responses": {"200": _ok("success"), **_MODEL_ERRORS},
    }
    if method in ("post", "put", "patch"):
        operation["requestBody"] = _json_body({"type": "object"}, required=False)
    return operation


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for the routes registered on ``app``."""
    registered: dict[str, set[str]] = {}
    documented: dict[str, dict[str, Any]] = {}
    modules: list[str] = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or route.method in ("HEAD", "OPTIONS", "*"):
            continue
        registered.setdefault(path, set()).add(route.method.lower())
        module = getattr(route.handler, "__module__", None)
        if module and module not in modules:
            modules.append(module)
    sources: list[Mapping[str, Any]] = [FALLBACK_PATHS, *(_module_paths(m) for m in modules)]
    for source in sources:  # later sources (the route's own module) win
        for path, operations in source.items():
            for method, operation in operations.items():
                documented.setdefault(path, {})[method] = copy.deepcopy(operation)
    paths: dict[str, dict[str, Any]] = {}
    for path in sorted(registered):
        for method in sorted(registered[path]):
            operation = documented.get(path, {}).get(method) or _undocumented(method, path)
            operation.setdefault("operationId", f"{method}_{path.strip('/').replace('/', '_')}"
                                 or method)
            paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "Lemonade Supervisor", "version": __version__,
                 "description": "A local OpenAI-compatible model server; one worker process "
                                "per loaded model."},
        "paths": paths,
        "components": copy.deepcopy(_COMPONENTS),
        "security": [{"bearer": []}, {}],
    }


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    # Built per request (a few hundred microseconds): the app is frozen once it runs.
    return web.json_response(build_document(request.app))
