"""The published schemas are the ones the routes check requests with, and cover every route.

In process (aiohttp's test client over the real application, no worker is ever started):
every registered route is documented with a 200 response schema and, for a POST, a request
schema; a body that violates a route's schema is a 400 from that very schema (the check is
recorded by name); a 405 says what is allowed; compat and lifecycle routes refuse bodies
they do not understand; the document is fitted to the configured models.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import schemathesis
from aiohttp import web

from supervisor.api import schemas
from supervisor.api.app import create_app
from supervisor.api.openapi import build_document
from supervisor.config import load_settings

CONFIG = """
[server]
default_model = "tone"
[models.tone]
recipe = "synthetic"
type = "tts"
[models.chatty]
recipe = "llm"
type = "llm"
[models.vectors]
recipe = "embedding"
type = "embedding"
"""


@pytest.fixture
def app(tmp_path: Path) -> web.Application:
    config = tmp_path / "lemonade.toml"
    config.write_text(CONFIG)
    settings = load_settings(cli={"config": str(config)}, env={}, cwd=tmp_path)
    (tmp_path / "run").mkdir()
    return create_app(settings, runtime_base=str(tmp_path / "run"))


@pytest.fixture
async def client(aiohttp_client, app: web.Application):  # type: ignore[no-untyped-def]
    return await aiohttp_client(app)


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the schemas requests were checked against, in order."""
    names: list[str] = []
    real = schemas.check

    def recording(name: str, data: Any) -> None:
        names.append(name)
        real(name, data)

    monkeypatch.setattr(schemas, "check", recording)
    yield names


def _registered(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and route.method not in ("HEAD", "OPTIONS", "*"):
            out.add((route.method.lower(), path))
    return out


def _request_schema(operation: dict[str, Any]) -> tuple[str, str | None] | None:
    """(media type, component name) of the request body; the name is None for a schema
    written inline (routes that check their bodies by hand, e.g. Ollama's)."""
    body = operation.get("requestBody")
    if body is None:
        return None
    (media, content), = body["content"].items()
    target = content["schema"].get("$ref")
    return media, target.rsplit("/", 1)[1] if target else None


def _error_shape(response: dict[str, Any]) -> str:
    """'Error' or 'OllamaError': the shape an error response is documented with."""
    if "$ref" in response:
        return "Error"  # one of #/components/responses/*, all OpenAI-shaped
    schema = response["content"]["application/json"]["schema"]
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    assert schema["properties"]["error"] == {"type": "string"}, schema
    return "OllamaError"


def test_every_route_has_a_documented_request_and_200_response(app: web.Application) -> None:
    doc = build_document(app)
    schemathesis.openapi.from_dict(doc).validate()
    for method, path in _registered(app):
        operation = doc["paths"][path][method]
        assert "(undocumented)" not in operation["summary"], (method, path)
        ok = operation["responses"]["200"]
        assert ok["content"], (method, path)
        for media in ok["content"].values():
            assert media["schema"], (method, path)
        if method == "post":
            assert _request_schema(operation) is not None, path
        for status, response in operation["responses"].items():
            if status.startswith("3"):  # a redirect (GET / for a browser) is no error
                continue
            if status != "200" and response.get("content") != ok["content"]:  # (a 503
                # status report, as /api/v1/health's, comes in its 200's shape)
                assert _error_shape(response) in ("Error", "OllamaError"), (path, status)
    # Every component is valid JSON Schema once translated, and compiles.
    for name in schemas.components():
        schemas.validator(name)


def test_the_document_names_the_configured_models(app: web.Application) -> None:
    doc = build_document(app)
    components = doc["components"]["schemas"]
    assert components["SpeechRequest"]["properties"]["model"]["enum"] == ["tone"]
    assert components["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["chatty"]
    assert components["EmbeddingsRequest"]["properties"]["model"]["enum"] == ["vectors"]
    assert components["LoadRequest"]["properties"]["model_name"]["enum"] == [
        "chatty", "tone", "vectors"]
    assert components["UnloadRequest"]["properties"]["model_name"]["enum"][-1] is None
    # No asr model: the name keeps its spelling rule only (an unknown name is a 404).
    assert "enum" not in components["TranscriptionRequest"]["properties"]["model"]
    # The synthetic kind's own voices and formats.
    assert "tone" in components["SpeechRequest"]["properties"]["voice"]["enum"]
    assert components["SpeechRequest"]["properties"]["response_format"]["enum"] == [
        "wav", "pcm", None]
    (voices_model,) = doc["paths"]["/v1/audio/voices"]["get"]["parameters"]
    assert voices_model["required"] is False  # there is a default speech model


async def _call(client: Any, method: str, path: str, media: str, body: Any) -> Any:
    if media == "multipart/form-data":
        form = aiohttp.FormData(default_to_multipart=True)
        for key, value in body.items():
            form.add_field(key, value)
        return await client.request(method, path, data=form)
    return await client.request(method, path, json=body)


async def test_a_body_against_the_schema_is_a_400_from_that_schema(
        client: Any, app: web.Application, checked: list[str]) -> None:
    doc = build_document(app)
    seen = 0
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            found = _request_schema(operation)
            if found is None:
                continue
            media, name = found
            # Required fields missing, or (where there are none) a field nobody declared.
            body = {"no_such_field": "1"}
            if name is not None and not schemas.components()[name].get("required"):
                assert schemas.components()[name].get("additionalProperties") is False, name
            checked.clear()
            response = await _call(client, method, path, media, body)
            text = await response.text()
            assert response.status == 400, (path, text)
            if name is None:  # a route that checks its body by hand (its own 400 will do)
                continue
            assert checked == [name], (path, checked)
            error = (await response.json())["error"]  # OpenAI's shape, or Ollama's string
            message = error if isinstance(error, str) else error["message"]
            assert "required" in message or "no_such_field" in message, error
            seen += 1
    assert seen >= 11


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/v1/chat/completions", {"model": "chatty", "messages": [{"role": "user", "content": "x"}],
                              "temperature": 3}, "'temperature' must be between 0 and 2, got 3"),
    ("/v1/chat/completions", {"model": "chatty", "messages": [{"role": "tool", "content": "x"}]},
     "'messages[0].role' must be one of system, developer, user, assistant"),
    ("/v1/chat/completions", {"model": "chatty", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 5, "max_completion_tokens": 6}, "send one"),
    ("/v1/chat/completions", {"model": "chatty", "messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}},
     "'stream_options' is only allowed when 'stream' is true"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "top_p": 0},
     "'top_p' must be greater than 0 and at most 1"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "n": 2}, "'n' must be 1"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "keep_alive": "soon"}, "keep_alive"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "keep_alive": 10**400}, "keep_alive"),
    ("/v1/embeddings", {"model": "vectors", "input": [1, 2]}, "'input' must be"),
    ("/v1/embeddings", {"model": "vectors", "input": "x", "dimensions": 0},
     "'dimensions' must be between 1 and 65536"),
    ("/v1/audio/speech", {"model": "tone", "input": "   "}, "'input' must not be empty"),
    ("/v1/audio/speech", {"model": "tone", "input": "x", "response_format": "ogg"},
     "'response_format' must be one of"),
    ("/v1/audio/speech", {"model": "bad name!", "input": "x"}, "'model' must be a model name"),
    ("/api/v1/load", {"model_name": "tone", "recipe": "synthetic"}, "'recipe' is not accepted"),
    ("/api/v1/load", {"model_name": "tone", "pin": True}, "'pin' is not a field"),
    ("/api/v1/load", {"model_name": "tone", "idle_timeout": -5}, "idle_timeout"),
    ("/api/v1/unload", {"name": "tone"}, "'name' is not a field of this request"),
    ("/api/v1/timeout", {"idle_timeout": "5m", "model": "tone"}, "'model' is not a field"),
    ("/model/timeout", {"timeout_seconds": 30}, "'timeout_seconds' must be between 60"),
    ("/model/timeout", {"timeout_seconds": 90, "extra": 1}, "'extra' is not a field"),
    ("/dev/unload", {"model": "tone"}, "'model' is not a field"),
    ("/model/unload", {"force": True}, "'force' is not a field"),
])
async def test_violations_are_400s_naming_the_field(client: Any, path: str, body: Any,
                                                    needle: str) -> None:
    response = await client.post(path, json=body)
    error = (await response.json())["error"]
    assert response.status == 400, error
    assert needle in error["message"], error


@pytest.mark.parametrize("raw", [b"garbage", b"[]", b"\"unload\"", b"null", b"{\"a\": 1}",
                                 b"\n", b"  "])
@pytest.mark.parametrize("path", ["/dev/unload", "/model/unload"])
async def test_compat_unloads_refuse_bodies_they_do_not_understand(
        client: Any, path: str, raw: bytes) -> None:
    response = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert response.status == 400, await response.text()


@pytest.mark.parametrize("raw", [b"", b"{}", b" {} "])
@pytest.mark.parametrize("path", ["/dev/unload", "/model/unload"])
async def test_compat_unloads_take_no_body_or_an_empty_object(
        client: Any, path: str, raw: bytes) -> None:
    response = await client.post(path, data=raw)
    assert response.status == 200, await response.text()


async def test_a_bad_voices_query_is_a_400(client: Any) -> None:
    response = await client.get("/v1/audio/voices", params={"model": ""})
    assert response.status == 400
    assert "query parameter 'model'" in (await response.json())["error"]["message"]


async def test_405_says_which_methods_are_allowed(client: Any) -> None:
    response = await client.get("/v1/chat/completions")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert (await response.json())["error"]["code"] == "method_not_allowed"
    response = await client.delete("/v1/models")
    assert response.status == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD"}


async def test_the_served_document_is_the_built_one(client: Any, app: web.Application) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert await response.json() == build_document(app)


def _valid(name: str, instance: Any) -> None:
    schemas.validator(name).validate(instance)


def test_response_schemas_describe_what_the_routes_build() -> None:
    from supervisor.api.app import error_response
    from supervisor.api.chat import _Shape

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    for chat, whole, chunk in ((True, "ChatCompletion", "ChatCompletionChunk"),
                               (False, "Completion", "CompletionChunk")):
        shape = _Shape(chat, "m")
        _valid(whole, shape.whole("hi", "stop", usage))
        _valid(chunk, shape.chunk("", None, first=True, usage=True))
        _valid(chunk, shape.chunk("x", None))
        _valid(chunk, shape.chunk(None if chat else "", "length", usage=True))
    body = error_response(400, "'x' is bad", type_="invalid_request_error", code="bad").body
    assert isinstance(body, bytes)
    _valid("Error", json.loads(body))
    with pytest.raises(jsonschema.ValidationError):
        _valid("ChatCompletion", {"id": "x"})
