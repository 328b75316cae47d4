"""``GET /openapi.json``: an OpenAPI 3.0 document of every route the server has.

The document is assembled when it is first asked for, from the routes actually registered
on the application, so it cannot describe a route that does not exist or miss one that does:

* every route module may define ``OPENAPI_PATHS``: a dict ``{path: {method: operation}}`` in
  OpenAPI 3.0 form (lower-case methods), usually made with :func:`schemas.operation`; every
  schema of :mod:`supervisor.api.schemas` is at ``#/components/schemas/<name>`` (``Error``
  and ``OllamaError`` among them), its error responses at ``#/components/responses/<name>``.
  The module of each registered handler is looked up and its ``OPENAPI_PATHS`` merged in;
* :data:`FALLBACK_PATHS` here describes routes whose modules do not (yet) document
  themselves; a module's own description wins;
* any registered route still undescribed gets a minimal entry (its method, the JSON error
  responses), so fuzzers and clients see it anyway.

Adding a route therefore needs nothing here: define ``OPENAPI_PATHS`` in its module. The
document is then fitted to the server (:func:`schemas.specialize`): model names become the
configured ones.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from supervisor import __version__
from supervisor.api import schemas
from supervisor.api.keys import MANAGER

routes = web.RouteTableDef()

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/openapi.json": {"get": schemas.operation(
        "This document (fitted to this server's configured models)",
        ok=schemas.json_response("OpenAPIDocument", "OpenAPI 3.0 document"))},
}

#: Routes of modules that do not describe themselves; a module's own description wins.
FALLBACK_PATHS: dict[str, dict[str, Any]] = {}


def _components() -> dict[str, Any]:
    return {
        "schemas": schemas.deep_copy_components(),
        "responses": schemas.response_components(),
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
        "summary": f"{method.upper()} {path} (undocumented)",
        "responses": {"200": {"description": "success",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **schemas.errors(schemas.MODEL_ROUTE)},
    }
    if method in ("post", "put", "patch"):
        operation["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": {"type": "object"}}}}
    return operation


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for the routes registered on ``app``, fitted to its models."""
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
    document = {
        "openapi": "3.0.3",
        "info": {"title": "Lemonade Supervisor", "version": __version__,
                 "description": "A local OpenAI-compatible model server; one worker process "
                                "per loaded model."},
        "paths": paths,
        "components": _components(),
        "security": [{"bearer": []}, {}],
    }
    if MANAGER in app:
        schemas.specialize(document, app[MANAGER])
    return document


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    # Built per request (a few hundred microseconds): the app is frozen once it runs.
    return web.json_response(build_document(request.app))
