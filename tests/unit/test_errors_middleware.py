"""The error middleware: every exception becomes the right answer, and only bugs say so."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from supervisor.api.app import CLIENT_CLOSED_REQUEST, errors_middleware
from supervisor.errors import ServiceUnavailable


async def client_for(aiohttp_client, handler):  # type: ignore[no-untyped-def]
    app = web.Application(middlewares=[errors_middleware])
    app.router.add_get("/x", handler)
    return await aiohttp_client(app)


async def test_a_client_that_hung_up_is_not_logged_as_a_bug(aiohttp_client, caplog) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        # What aiohttp raises when a stream is written after the peer reset the connection.
        raise ConnectionResetError("Cannot write to closing transport")

    client = await client_for(aiohttp_client, handler)
    with caplog.at_level(logging.INFO, logger="supervisor.api.app"):
        response = await client.get("/x")
    assert response.status == CLIENT_CLOSED_REQUEST
    assert "client went away during GET /x" in caplog.text
    assert "this is a bug" not in caplog.text


async def test_lemonade_errors_keep_their_status_and_retry_after(aiohttp_client) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise ServiceUnavailable("model 'x' is cooling down", retry_after_s=2.2)

    client = await client_for(aiohttp_client, handler)
    response = await client.get("/x")
    assert response.status == 503 and response.headers["Retry-After"] == "3"
    assert (await response.json())["error"]["message"] == "model 'x' is cooling down"


async def test_anything_else_is_a_logged_500(aiohttp_client, caplog) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise KeyError("oops")

    client = await client_for(aiohttp_client, handler)
    with caplog.at_level(logging.ERROR):
        response = await client.get("/x")
    assert response.status == 500
    assert (await response.json())["error"]["code"] == "internal_error"
    assert "this is a bug" in caplog.text


@pytest.mark.parametrize("path", ["/nope"])
async def test_unknown_routes_are_json_404s(aiohttp_client, path: str) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response()

    client = await client_for(aiohttp_client, handler)
    response = await client.get(path)
    assert response.status == 404
    assert "no route for GET /nope" in (await response.json())["error"]["message"]
