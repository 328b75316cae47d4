"""Ollama's native API end to end, without an LLM load: a real server, the official ``ollama``
client, the real all-MiniLM-L6-v2 weights for the embedding routes, raw HTTP for the bytes.

What an Ollama user checks: ``list()``, ``show()``, ``ps()``, ``embed()``, ``embeddings()`` and
``/api/version`` answer in Ollama's shapes; ``keep_alive: 0`` ends the worker process and
``"10m"`` shows in ``/api/ps`` and ``lemonade status --json``; every error on an Ollama route
is Ollama's ``{"error": "..."}`` with the right status (404 unknown model, 400 bad value or a
model of the wrong type, 413 body too large), and a bad request loads nothing. The chat and
generate routes with a real model are in ``test_ollama_llm.py`` (slow).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import ollama
import pytest

from tests.e2e.conftest import Server, module_server, pid_gone, run_cli, wait_for

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.smol]
recipe = "llm"
type = "llm"
[models.minilm]
recipe = "embedding"
type = "embedding"
[models.tone]
recipe = "synthetic"
type = "tts"
"""
LOAD_TIMEOUT_S = 120.0
DIMENSIONS = 384


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module, minilm loaded (tests that end or start workers have their
    own: the leak guard wants each test's processes gone when it ends)."""
    yield from module_server(tmp_path_factory, CONFIG, "ollama", load=("minilm",),
                             load_timeout_s=LOAD_TIMEOUT_S)


@pytest.fixture
def client(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=LOAD_TIMEOUT_S) as client:
        yield client


def ollama_error(result: Any, status: int) -> str:
    """Asserts Ollama's error shape and status; returns the message."""
    assert result.status == status, result.body[:300]
    data = result.json()
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert isinstance(data["error"], str) and data["error"], data
    return str(data["error"])


def spawns(server: Server) -> int:
    return int(server.status()["server"]["spawns"])


# ===================================================================== models, version, /


def test_version_and_root(server: Server, client: ollama.Client) -> None:
    version = server.get("/api/version").json()
    assert set(version) == {"version"} and version["version"][0].isdigit()
    root = server.get("/")
    assert root.status == 200 and root.headers["Content-Type"].startswith("text/plain")
    assert b"running" in root.body
    assert server.request("HEAD", "/").status == 200


def test_list_shows_the_models_ollama_can_serve(client: ollama.Client) -> None:
    listed = client.list()
    names = [m.model for m in listed.models]
    assert names == ["smol", "minilm"]  # not the speech model: no Ollama route serves it
    for row in listed.models:
        assert isinstance(row.modified_at, datetime)
        assert row.size is not None and row.size >= 0  # the memory estimate; 0 = unknown
        assert row.digest is not None and len(row.digest) == 64
        assert row.details is not None and row.details.family and row.details.families


def test_tags_raw_shape(server: Server) -> None:
    rows = server.get("/api/tags").json()["models"]
    for row in rows:
        assert set(row) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert set(row["details"]) == {"parent_model", "format", "family", "families",
                                       "parameter_size", "quantization_level"}


def test_show(client: ollama.Client) -> None:
    shown = client.show("minilm")
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None and "general.architecture" in shown.modelinfo
    assert shown.details is not None and shown.modelfile and "minilm" in shown.modelfile
    assert client.show("smol:latest").capabilities == ["completion"]  # Ollama's default tag


def test_show_unknown_model_is_a_404_in_ollamas_shape(server: Server,
                                                      client: ollama.Client) -> None:
    message = ollama_error(server.post("/api/show", {"model": "nope"}), 404)
    assert "nope" in message and "smol" in message  # names what is configured
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope")
    assert caught.value.status_code == 404 and "nope" in caught.value.error


# ===================================================================== embeddings


def test_embed_one_and_many(server: Server, client: ollama.Client) -> None:
    one = client.embed(model="minilm", input="The sky is blue.")
    assert one.model == "minilm" and len(one.embeddings) == 1
    assert len(one.embeddings[0]) == DIMENSIONS
    assert one.prompt_eval_count is not None and one.prompt_eval_count > 3
    assert one.total_duration is not None and one.total_duration > 0
    many = client.embed(model="minilm", input=["The sky is blue.", "Grass is green.",
                                               "The sky is blue."])
    a, b, c = many.embeddings
    assert a == c and a != b
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-3)  # unit length, as Ollama


def test_legacy_embeddings_agree_with_embed(client: ollama.Client) -> None:
    old = client.embeddings(model="minilm", prompt="The sky is blue.")
    new = client.embed(model="minilm", input="The sky is blue.")
    assert len(old.embedding) == DIMENSIONS
    assert all(math.isclose(x, y, abs_tol=1e-5)
               for x, y in zip(old.embedding, new.embeddings[0], strict=True))


def test_embed_without_input_loads_the_model(start_server: Any) -> None:
    server = start_server(CONFIG)
    result = server.post("/api/embed", {"model": "minilm"}, timeout=LOAD_TIMEOUT_S)
    assert result.status == 200, result.body[:300]
    assert result.json()["embeddings"] == []
    assert server.model("minilm")["state"] == "ready"
    assert server.post("/api/embeddings", {"model": "minilm", "prompt": ""}).json() == {
        "embedding": []}


def test_keep_alive_0_unloads_and_the_worker_is_gone(start_server: Any) -> None:
    server = start_server(CONFIG)
    result = server.post("/api/embed", {"model": "minilm", "input": "bye", "keep_alive": 0},
                         timeout=LOAD_TIMEOUT_S)
    assert result.status == 200, result.body[:300]
    pid = int(result.headers["X-Lemonade-Worker-Pid"])
    wait_for(lambda: pid_gone(pid), 15, what=f"worker {pid} to exit")
    row = server.wait_state("minilm", "unloaded")
    assert row["last_eviction"]["reason"] == "keep_alive_0"
    assert all(m["name"] != "minilm" for m in server.get("/api/ps").json()["models"])
    # It stays that way for the model's next requests until one says otherwise.
    server.post("/api/embed", {"model": "minilm", "input": "warm", "keep_alive": "5m"},
                timeout=LOAD_TIMEOUT_S)
    assert server.model("minilm")["state"] == "ready"


def test_keep_alive_10m_shows_in_ps_and_status(server: Server, client: ollama.Client) -> None:
    before = datetime.now(UTC)
    client.embed(model="minilm", input="stay a while", keep_alive="10m")
    (row,) = [m for m in client.ps().models if m.model == "minilm"]
    assert row.expires_at is not None
    left = row.expires_at - before
    assert timedelta(minutes=9) < left <= timedelta(minutes=10, seconds=5), left
    assert row.size is not None and row.size > 10 * 1024 * 1024
    assert row.digest is not None and len(row.digest) == 64
    assert row.details is not None and row.details.parameter_size.endswith("M")  # ~22.7M
    env = {"LEMONADE_URL": server.url}
    status = run_cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    model = next(m for m in json.loads(status.stdout)["models"] if m["name"] == "minilm")
    assert (model["idle_timeout_s"], model["idle_timeout_source"]) == (600, "request")
    ps_row = next(m for m in server.get("/api/ps").json()["models"] if m["name"] == "minilm")
    assert model["expires_at"] == ps_row["expires_at"]
    # Negative: forever (no expiry); the next request's keep_alive holds until changed.
    client.embed(model="minilm", input="forever", keep_alive=-1)
    (row,) = [m for m in client.ps().models if m.model == "minilm"]
    assert row.expires_at is None
    client.embed(model="minilm", input="back to ten minutes", keep_alive="10m")


# ===================================================================== bad input


BAD: list[tuple[str, str, dict[str, Any], int, list[str]]] = [
    ("chat-unknown-model", "/api/chat", {"model": "nope", "messages": []}, 404, ["nope"]),
    ("generate-unknown-model", "/api/generate", {"model": "nope", "prompt": "x"}, 404,
     ["nope"]),
    ("embed-unknown-model", "/api/embed", {"model": "nope", "input": "x"}, 404, ["nope"]),
    ("embeddings-unknown-model", "/api/embeddings", {"model": "nope", "prompt": "x"}, 404,
     ["nope"]),
    ("chat-embedding-model", "/api/chat",
     {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}, 400,
     ["minilm", "embedding", "llm"]),
    ("generate-speech-model", "/api/generate", {"model": "tone", "prompt": "hi"}, 400,
     ["tone", "tts"]),
    ("embed-llm", "/api/embed", {"model": "smol", "input": "hi"}, 400, ["smol", "llm"]),
    ("model-not-a-string", "/api/chat", {"model": 3, "messages": []}, 400, ["model"]),
    ("no-model", "/api/generate", {"prompt": "x"}, 400, ["model"]),
    ("messages-not-a-list", "/api/chat", {"model": "smol", "messages": "hi"}, 400,
     ["messages"]),
    ("message-role", "/api/chat",
     {"model": "smol", "messages": [{"role": "robot", "content": "x"}]}, 400,
     ["messages[0].role"]),
    ("message-images", "/api/chat",
     {"model": "smol", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     400, ["images"]),
    ("stream-not-bool", "/api/chat",
     {"model": "smol", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     ["stream"]),
    ("options-not-object", "/api/generate", {"model": "smol", "prompt": "x", "options": [1]},
     400, ["options"]),
    ("temperature", "/api/generate",
     {"model": "smol", "prompt": "x", "options": {"temperature": "hot"}}, 400,
     ["options.temperature"]),
    ("temperature-range", "/api/chat",
     {"model": "smol", "messages": [{"role": "user", "content": "x"}],
      "options": {"temperature": 9}}, 400, ["options.temperature"]),
    ("repeat-penalty", "/api/generate",
     {"model": "smol", "prompt": "x", "options": {"repeat_penalty": 0.5}}, 400,
     ["options.repeat_penalty"]),
    ("num-predict", "/api/generate",
     {"model": "smol", "prompt": "x", "options": {"num_predict": "ten"}}, 400,
     ["options.num_predict"]),
    ("top-k", "/api/generate", {"model": "smol", "prompt": "x", "options": {"top_k": 1.5}},
     400, ["options.top_k"]),
    ("stop", "/api/generate", {"model": "smol", "prompt": "x", "options": {"stop": [1]}},
     400, ["options.stop"]),
    ("format", "/api/chat", {"model": "smol", "messages": [{"role": "user", "content": "x"}],
                             "format": "json"}, 400, ["format"]),
    ("tools", "/api/chat", {"model": "smol", "messages": [{"role": "user", "content": "x"}],
                            "tools": [{"type": "function"}]}, 400, ["tools"]),
    ("images", "/api/generate", {"model": "smol", "prompt": "x", "images": ["aGk="]}, 400,
     ["images"]),
    ("template", "/api/generate", {"model": "smol", "prompt": "x", "template": "{{ .P }}"},
     400, ["template"]),
    ("suffix", "/api/generate", {"model": "smol", "prompt": "x", "suffix": "end"}, 400,
     ["suffix"]),
    ("raw-with-system", "/api/generate",
     {"model": "smol", "prompt": "x", "raw": True, "system": "be nice"}, 400,
     ["system", "raw"]),
    ("think", "/api/chat", {"model": "smol", "messages": [{"role": "user", "content": "x"}],
                            "think": True}, 400, ["think"]),
    ("keep-alive", "/api/generate", {"model": "smol", "prompt": "x", "keep_alive": "soon"},
     400, ["keep_alive"]),
    ("embed-input-type", "/api/embed", {"model": "minilm", "input": 5}, 400, ["input"]),
    ("embed-input-item", "/api/embed", {"model": "minilm", "input": ["ok", 3]}, 400,
     ["input[1]"]),
    ("embed-truncate-false", "/api/embed", {"model": "minilm", "input": "x",
                                            "truncate": False}, 400, ["truncate"]),
    ("embeddings-prompt-type", "/api/embeddings", {"model": "minilm", "prompt": ["x"]}, 400,
     ["prompt"]),
    ("show-no-model", "/api/show", {}, 400, ["model"]),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input_is_an_ollama_error_and_loads_nothing(
        server: Server, path: str, body: dict[str, Any], status: int, words: list[str]) -> None:
    before = spawns(server)
    message = ollama_error(server.post(path, body), status)
    for word in words:
        assert word in message, message
    assert spawns(server) == before
    assert server.model("smol")["state"] == "unloaded"


def test_malformed_json_and_oversize_bodies(server: Server) -> None:
    for path in ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"):
        message = ollama_error(server.post(path, data=b'{"model": "smol",'), 400)
        assert "JSON" in message
        huge = json.dumps({"model": "smol", "prompt": "x" * (2 * 1024 * 1024)}).encode()
        message = ollama_error(server.post(path, data=huge), 413)
        assert "limit" in message


def test_unknown_ollama_route_and_method_are_ollama_errors(server: Server) -> None:
    ollama_error(server.post("/api/pull", {"model": "smol"}), 404)
    ollama_error(server.get("/api/chat"), 405)
    # Lemonade's own /api/v1 routes keep OpenAI's error shape.
    result = server.post("/api/v1/load", {"model_name": "nope"})
    assert result.status == 404 and isinstance(result.json()["error"], dict)


def test_the_client_raises_ollamas_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        for _ in client.chat(model="minilm", messages=[{"role": "user", "content": "x"}],
                             stream=True):
            raise AssertionError("a stream began")
    assert caught.value.status_code == 400 and "embedding" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="smol", input="x")
    assert caught.value.status_code == 400


def test_the_openapi_document_describes_the_ollama_routes(server: Server) -> None:
    doc = server.get("/openapi.json").json()
    paths, components = doc["paths"], doc["components"]["schemas"]
    for path, method in (("/api/chat", "post"), ("/api/generate", "post"),
                         ("/api/embed", "post"), ("/api/embeddings", "post"),
                         ("/api/tags", "get"), ("/api/show", "post"),
                         ("/api/version", "get"), ("/", "get")):
        operation = paths[path][method]
        assert "200" in operation["responses"], path
        if method == "post":
            assert "requestBody" in operation, path
        error = operation["responses"].get("404") or operation["responses"]["401"]
        target = error["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert components[target]["properties"]["error"]["type"] == "string", path
        if method == "post":
            request = operation["requestBody"]["content"]["application/json"]["schema"]
            assert request["$ref"].rsplit("/", 1)[1] in components, path
    # The document names the configured models of the type each route needs.
    assert components["OllamaChatRequest"]["properties"]["model"]["enum"] == ["smol"]
    assert components["OllamaEmbedRequest"]["properties"]["model"]["enum"] == ["minilm"]


def test_timestamps_are_rfc3339(server: Server) -> None:
    row = server.get("/api/tags").json()["models"][0]
    parsed = datetime.fromisoformat(row["modified_at"].replace("Z", "+00:00"))
    assert parsed.tzinfo is not None and parsed.year > 2000
    assert time.time() - parsed.timestamp() > -60
