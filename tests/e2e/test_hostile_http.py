"""Hostile HTTP input (reliability.md part c): every item gets the right 4xx, never a 500,
never a worker spawned, and the server stays up. Two module-scoped servers: one open
(loopback, no key), one with an API key (the fail-closed route guard)."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.api.security import OPEN_ROUTES
from tests.e2e.conftest import Server, launch_server

TONE = """
[server]
auto_unload_timer = "5s"
stop_grace = "1s"
[models.tone]
recipe = "synthetic"
type = "tts"
"""
KEY = "s3cret-key-for-tests"
MIB = 1024 * 1024


def _served(tmp: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = launch_server(TONE, tmp, env=env)
    try:
        yield server
        assert server.alive(), server.log_text()
        assert not any("this is a bug" in line for line in server.log_lines), server.log_text()
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _served(Path(tmp_path_factory.mktemp("hostile")))


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _served(Path(tmp_path_factory.mktemp("hostile-key")), {"LEMONADE_API_KEY": KEY})


def _speech(model: object = "tone", **extra: object) -> bytes:
    return json.dumps({"model": model, "input": "hi", **extra}).encode()


JSON_QUIRKS = [
    ("null", b"null"),
    ("number", b"42"),
    ("string", b'"model"'),
    ("infinity", b'{"model": "tone", "input": "hi", "speed": Infinity}'),
    ("minus-infinity", b'{"model": "tone", "input": "hi", "speed": -Infinity}'),
    ("deep-nesting", b'{"model": "tone", "input": "hi", "x": ' + b"[" * 100 + b"]" * 100 + b"}"),
    ("very-deep-nesting", b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("huge-integer", b'{"model": "tone", "input": "hi", "speed": ' + b"9" * 5000 + b"}"),
    ("float-overflow", b'{"model": "tone", "input": "hi", "speed": 1e400}'),
    ("invalid-utf8", b'{"model": "tone", "input": "\xff\xfe"}'),
    ("bom", b'\xef\xbb\xbf{"model": "tone", "input": "hi"}'),
    ("stream-string-false", _speech(stream="false")),
    ("speed-bool", _speech(speed=True)),
]


@pytest.mark.parametrize("body", [c[1] for c in JSON_QUIRKS], ids=[c[0] for c in JSON_QUIRKS])
def test_json_quirks_are_400(open_server: Server, body: bytes) -> None:
    result = open_server.post("/v1/audio/speech", data=body)
    assert result.status == 400, result.body[:300]
    assert result.error["type"] == "invalid_request_error"


BAD_NAMES = [
    "../x", "..\\x", "/etc/passwd", "C:\\x", "~root", "x/../../y", "%2e%2e%2f",
    "%252e%252e%252f", "..%c0%af", "x\x00.yaml", "tone.", "tone ",
    "\uff0e\uff0e\uff0f",  # fullwidth "../"
    "--model-path=/etc/shadow",
    "-c", "a" * 129, "", " ", 42, None, ["tone"], {"name": "tone"}, True,
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:30] for n in BAD_NAMES])
def test_hostile_model_names_are_400_or_404_and_never_spawn(open_server: Server,
                                                            name: object) -> None:
    for path, body in (("/v1/audio/speech", _speech(name)),
                       ("/api/v1/load", json.dumps({"model_name": name}).encode())):
        result = open_server.post(path, data=body)
        assert result.status in (400, 404), (path, result.status, result.body[:200])
    assert open_server.status()["server"]["spawns"] == 0


def test_case_variants_do_not_alias_a_model(open_server: Server) -> None:
    for name in ("TONE", "Tone", "tonE"):
        assert open_server.post("/v1/audio/speech", data=_speech(name)).status == 404


@pytest.mark.parametrize("field", ["recipe", "path", "cmd"])
def test_load_refuses_recipe_path_and_command_fields(open_server: Server, field: str) -> None:
    result = open_server.post("/api/v1/load", {"model_name": "tone", field: "/bin/sh"})
    assert result.status == 400 and field in result.error["message"]


def test_admin_bounds(open_server: Server) -> None:
    assert open_server.post("/api/v1/unload", {"model_name": "nope"}).status == 404
    assert open_server.post("/api/v1/timeout", {"idle_timeout": -5}).status == 400
    assert open_server.post("/api/v1/load", {"model_name": "tone", "pinned": "yes"}).status == 400


def test_gzip_bomb_and_chunked_bodies_are_413(open_server: Server) -> None:
    bomb = gzip.compress(b'{"model": "tone", "input": "' + b"a" * (4 * MIB) + b'"}')
    assert len(bomb) < 64 * 1024
    result = open_server.post("/v1/audio/speech", data=bomb,
                              headers={"Content-Encoding": "gzip"})
    assert result.status in (400, 413), result.body[:200]
    host, port = open_server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        def chunks() -> Iterator[bytes]:
            yield b'{"model": "tone", "input": "'
            for _ in range(3):
                yield b"b" * MIB
            yield b'"}'

        conn.request("POST", "/v1/audio/speech", body=chunks(),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        response.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed before the whole body was sent
    finally:
        conn.close()


def _raw_request(server: Server, payload: bytes) -> bytes:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        return data


def test_oversized_and_too_many_headers_are_400_class(open_server: Server) -> None:
    long_header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"
    assert _raw_request(open_server, long_header).split(b" ")[1] in (b"400", b"431")
    many = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        f"X-H{i}: v\r\n".encode() for i in range(200)) + b"\r\n"
    assert _raw_request(open_server, many).split(b" ")[1] in (b"400", b"431")
    smuggle = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert _raw_request(open_server, smuggle).split(b" ")[1] == b"400"
    assert open_server.get("/health").status == 200


@pytest.mark.parametrize("origin", ["null", "http://user@localhost:3000", "http://localhost?x",
                                    "http://localhost#x", "https://evil.example",
                                    "http://localhost.evil.example"])
def test_odd_origins_get_no_cors_grant(open_server: Server, origin: str) -> None:
    result = open_server.get("/v1/models", headers={"Origin": origin})
    allowed = result.headers.get("Access-Control-Allow-Origin")
    assert result.status == 403 or allowed in (None, "http://localhost"), (result.status, allowed)
    preflight = open_server.request("OPTIONS", "/v1/models", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Private-Network" not in preflight.headers
    assert preflight.status == 403 or preflight.headers.get(
        "Access-Control-Allow-Origin") in (None, "http://localhost")


BAD_AUTH = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"bearer {KEY}x"},
    {"Authorization": "Basic " + KEY},
    {"Authorization": "Bearer " + KEY[:-1]},
    {"Authorization": "Bearer " + KEY + "x"},
    {"Authorization": "Bearer " + "k" * 10_000},
    {"Authorization": "Bearer \u00e9t\u00e9"},
    {"x-api-key": "wrong"},
]


def test_every_route_but_the_open_ones_needs_the_key(keyed_server: Server) -> None:
    """The open ones: /health, and the dashboard's static files, which hold no data."""
    # The route table comes from the server itself, so a new route cannot slip through.
    doc = keyed_server.get("/openapi.json",
                           headers={"Authorization": f"Bearer {KEY}"}).json()
    bodies: dict[str, set[bytes]] = {"openai": set(), "ollama": set()}
    for path, operations in doc["paths"].items():
        for method in operations:
            result = keyed_server.request(method.upper(), path,
                                          data=b"{}" if method != "get" else None)
            if path in OPEN_ROUTES:
                assert result.status == 200, path
                continue
            assert result.status == 401, (method, path, result.status)
            assert result.headers["WWW-Authenticate"] == "Bearer"
            # Ollama's routes (/ and /api/* but /api/v1/*) answer in Ollama's error shape.
            ollama = path == "/" or (path.startswith("/api/")
                                     and not path.startswith("/api/v1/"))
            bodies["ollama" if ollama else "openai"].add(result.body)
    # One answer per API shape, whatever the route: nothing about the route leaks.
    assert [len(b) for b in bodies.values()] == [1, 1], bodies
    (ollama_body,) = bodies["ollama"]
    assert set(json.loads(ollama_body)) == {"error"}


@pytest.mark.parametrize("headers", BAD_AUTH, ids=[str(i) for i in range(len(BAD_AUTH))])
def test_bad_keys_are_401_with_one_body(keyed_server: Server, headers: dict[str, str]) -> None:
    try:
        result = keyed_server.get("/v1/models", headers=headers)
    except UnicodeEncodeError:
        pytest.skip("urllib cannot send a non-latin-1 header")
    if len(headers.get("Authorization", "")) > 8190:
        assert result.status == 400  # the header parser refuses it before anyone reads it
        return
    assert result.status == 401
    reference = keyed_server.get("/v1/models")
    assert result.body == reference.body
    assert keyed_server.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status == 200
    assert keyed_server.get("/v1/models", headers={"x-api-key": KEY}).status == 200
