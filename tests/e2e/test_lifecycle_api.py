"""The lifecycle API end to end: load, unload, timeouts, eviction, events, metrics, auth.

Every check is on what a user can see from outside: HTTP answers, the worker process
existing or not, the SSE stream, the Prometheus text, and the exit of a refused start.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import (
    STARTUP_TIMEOUT_S,
    async_wait_for,
    http,
    pid_alive,
    pid_gone,
    server_env,
)

TWO_MODELS = """
[server]
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
idle_timeout = "10m"
[models.tone.options]
memory_mb = 16
[models.tone-2]
recipe = "synthetic"
type = "tts"
"""


# ===================================================================== load / unload


def test_load_then_unload_ends_the_process(start_server):
    server = start_server(TWO_MODELS)
    loaded = server.load("tone")
    assert loaded["state"] == "ready"
    pid = loaded["pid"]
    assert pid_alive(pid)
    assert server.worker_pids() == [pid]
    row = server.model("tone")
    assert (row["state"], row["pid"]) == ("ready", pid)
    assert row["loaded_at"] is not None and row["load_seconds"] > 0

    # Loading a loaded model is a no-op that reports the same worker.
    assert server.load("tone")["pid"] == pid
    assert server.status()["server"]["spawns"] == 1

    result = server.post("/api/v1/unload", {"model_name": "tone"})
    assert result.status == 200, result.body
    assert result.json()["unloaded"] == ["tone"]
    assert pid_gone(pid)  # gone by the time the answer arrives
    row = server.model("tone")
    assert (row["state"], row["pid"]) == ("unloaded", None)
    assert row["last_eviction"]["reason"] == "manual"
    assert server.worker_pids() == []

    # Unloading again is not an error, and says nothing was loaded.
    again = server.post("/api/v1/unload", {"model_name": "tone"})
    assert again.status == 200
    assert again.json()["unloaded"] == []
    assert "not loaded" in again.json()["message"]


def test_unload_without_body_unloads_everything(start_server):
    server = start_server(TWO_MODELS)
    pids = [server.load("tone")["pid"], server.load("tone-2")["pid"]]
    assert sorted(server.worker_pids()) == sorted(pids)
    result = server.post("/api/v1/unload")
    assert result.status == 200, result.body
    assert sorted(result.json()["unloaded"]) == ["tone", "tone-2"]
    assert all(pid_gone(pid) for pid in pids)
    for row in server.status()["models"]:
        assert row["state"] == "unloaded"
        assert row["last_eviction"]["reason"] == "unload_all"


def test_load_and_unload_errors(start_server):
    server = start_server(TWO_MODELS)
    cases = [
        ("/api/v1/load", {"model_name": "ghost"}, 404, "ghost"),
        ("/api/v1/load", {"model_name": "../x"}, 400, "model_name"),
        ("/api/v1/load", {}, 400, "model_name"),
        ("/api/v1/load", {"model_name": "tone", "pinned": "yes"}, 400, "pinned"),
        ("/api/v1/unload", {"model_name": "ghost"}, 404, "ghost"),
        ("/api/v1/unload", {"model_name": "tone", "force": 1}, 400, "force"),
    ]
    for path, body, status, word in cases:
        result = server.post(path, body)
        assert result.status == status, (path, body, result.body)
        assert word in result.error["message"], (path, body, result.error)
    assert server.status()["server"]["spawns"] == 0


async def test_unload_drains_the_request_in_flight_and_later_requests_reload(start_server):
    server = start_server("""
        [models.slow]
        recipe = "synthetic"
        type = "tts"
        [models.slow.options]
        latency_ms = 1200
        chunks = 12
    """)
    pid = (await asyncio.to_thread(server.load, "slow"))["pid"]
    async with aiohttp.ClientSession() as session:

        async def post(path: str, body: dict[str, Any]) -> tuple[int, float, str, bytes]:
            started = time.monotonic()
            async with session.post(server.url + path, json=body) as response:
                data = await response.read()
                return (response.status, time.monotonic() - started,
                        response.headers.get("X-Lemonade-Worker-Pid", ""), data)

        in_flight = asyncio.create_task(post("/v1/audio/speech", {"model": "slow", "input": "a"}))
        await async_wait_for(lambda: server.model("slow")["in_flight"] == 1, 5,
                             what="the request to reach the worker")
        unload = asyncio.create_task(post("/api/v1/unload", {"model_name": "slow"}))
        await asyncio.sleep(0.2)
        row = await asyncio.to_thread(server.model, "slow")
        assert row["state"] == "stopping"
        late = asyncio.create_task(post("/v1/audio/speech", {"model": "slow", "input": "b"}))
        first, unloaded, second = await asyncio.wait_for(
            asyncio.gather(in_flight, unload, late), 15)
    assert first[0] == 200 and first[2] == str(pid)  # not cut off
    assert unloaded[0] == 200 and b'"slow"' in unloaded[3]
    assert unloaded[1] > 0.5  # it waited for the request
    assert second[0] == 200, second[3]
    assert second[2] != str(pid)  # served by a fresh worker
    assert pid_gone(pid)


# ===================================================================== timeouts at runtime


def test_runtime_timeout_for_one_model_unloads_it(start_server):
    server = start_server(TWO_MODELS)
    pid = server.load("tone")["pid"]
    assert server.model("tone")["idle_timeout_s"] == 600
    result = server.post("/api/v1/timeout", {"model_name": "tone", "idle_timeout": "1s"})
    assert result.status == 200, result.body
    assert result.json()["idle_timeout_s"] == 1
    set_at = time.monotonic()
    row = server.model("tone")
    assert (row["idle_timeout_s"], row["idle_timeout_source"]) == (1, "runtime")
    row = server.wait_state("tone", "unloaded", timeout=6)
    assert 0.7 < time.monotonic() - set_at < 5
    assert row["last_eviction"]["reason"] == "idle"
    assert pid_gone(pid)
    # The runtime value stays for the next load.
    assert server.model("tone")["idle_timeout_s"] == 1


def test_runtime_global_timeout_applies_to_every_model(start_server):
    server = start_server(TWO_MODELS)
    pids = [server.load("tone")["pid"], server.load("tone-2")["pid"]]
    result = server.post("/api/v1/timeout", {"idle_timeout": "0.5s"})
    assert result.status == 200, result.body
    assert result.json()["model_name"] is None
    status = server.status()
    assert status["server"]["auto_unload_timer_s"] == 0.5
    assert status["server"]["auto_unload_timer_source"] == "runtime"
    for row in status["models"]:
        assert row["idle_timeout_s"] == 0.5
        assert "runtime" in row["idle_timeout_source"]
    server.wait_state("tone", "unloaded", timeout=5)
    server.wait_state("tone-2", "unloaded", timeout=5)
    assert all(pid_gone(pid) for pid in pids)


def test_runtime_timeout_never(start_server):
    server = start_server(TWO_MODELS)
    server.load("tone")
    result = server.post("/api/v1/timeout", {"model_name": "tone", "idle_timeout": 0})
    assert result.status == 200, result.body
    assert result.json()["idle_timeout_s"] is None
    row = server.model("tone")
    assert row["idle_timeout_s"] is None and row["expires_at"] is None


def test_bad_idle_timeout_is_400(start_server):
    server = start_server(TWO_MODELS)
    for value in ["soon", "-5s", True, [1], {"s": 1}, "5 parsecs", ""]:
        body = {"model_name": "tone", "idle_timeout": value}
        result = server.post("/api/v1/timeout", data=json.dumps(body).encode())
        assert result.status == 400, (value, result.body)
        assert "idle_timeout" in result.error["message"], value
    for body in [{"idle_timeout": "soon"}, {"model_name": "tone", "idle_timeout": "-1"}]:
        result = server.post("/api/v1/timeout", body)
        assert result.status == 400, (body, result.body)
    load = server.post("/api/v1/load", {"model_name": "tone", "idle_timeout": "soon"})
    assert load.status == 400
    assert "idle_timeout" in load.error["message"]
    missing = server.post("/api/v1/timeout", {"model_name": "tone"})
    assert missing.status == 400
    assert "idle_timeout" in missing.error["message"]
    unknown = server.post("/api/v1/timeout", {"model_name": "ghost", "idle_timeout": "1m"})
    assert unknown.status == 404
    assert "ghost" in unknown.error["message"]
    assert server.model("tone")["idle_timeout_s"] == 600  # nothing changed


# ===================================================================== eviction


MAX_ONE = """
[server]
max_loaded_models = 1
auto_unload_timer = "10m"
[models.first]
recipe = "synthetic"
type = "tts"
[models.second]
recipe = "synthetic"
type = "tts"
"""


def test_max_loaded_models_evicts_least_recently_used(start_server):
    server = start_server(MAX_ONE)
    first = server.load("first")["pid"]
    second = server.load("second")["pid"]
    assert pid_gone(first)
    assert pid_alive(second)
    rows = {row["name"]: row for row in server.status()["models"]}
    assert rows["first"]["state"] == "unloaded"
    assert rows["first"]["last_eviction"]["reason"] == "lru"
    assert (rows["second"]["state"], rows["second"]["pid"]) == ("ready", second)
    assert server.worker_pids() == [second]
    # A request for the first model swaps them back.
    result = server.speech("first")
    assert result.status == 200, result.body
    assert pid_gone(second)
    assert server.model("second")["last_eviction"]["reason"] == "lru"


def test_pinned_model_blocks_the_second_load_with_409(start_server):
    server = start_server(MAX_ONE)
    loaded = server.load("first", pinned=True)
    assert loaded["pinned"] is True
    result = server.post("/api/v1/load", {"model_name": "second"})
    assert result.status == 409, result.body
    assert "first" in result.error["message"]
    assert "pinned" in result.error["message"]
    speech = server.speech("second")
    assert speech.status == 409, speech.body
    assert "first" in speech.error["message"]
    rows = {row["name"]: row for row in server.status()["models"]}
    assert (rows["first"]["state"], rows["first"]["pid"]) == ("ready", loaded["pid"])
    assert rows["first"]["pinned"] is True
    assert rows["second"]["state"] == "unloaded"
    assert pid_alive(loaded["pid"])
    assert server.worker_pids() == [loaded["pid"]]
    # Unpinning by hand (an unload) lets the second one in.
    assert server.post("/api/v1/unload", {"model_name": "first"}).status == 200
    assert server.load("second")["state"] == "ready"


@pytest.mark.slow
async def test_two_models_wanted_at_once_under_a_cap_of_one_both_get_served(start_server):
    server = start_server(MAX_ONE)
    timeout = aiohttp.ClientTimeout(total=6)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def speak(model: str) -> int:
            async with session.post(server.url + "/v1/audio/speech",
                                    json={"model": model, "input": "hi"}) as response:
                await response.read()
                return response.status

        results = await asyncio.gather(speak("first"), speak("second"),
                                       return_exceptions=True)
    assert results == [200, 200], results
    spawns = (await asyncio.to_thread(server.status))["server"]["spawns"]
    assert spawns <= 3, f"{spawns} workers started to serve two requests"


# ===================================================================== events (SSE)


async def _next_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """Read one SSE event (skipping comments); returns its JSON data with its name."""
    name, data = None, None
    while True:
        raw = await response.content.readline()
        if not raw:
            raise AssertionError("the event stream ended")
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:].strip())
        elif line == "" and data is not None:
            assert data["event"] == name, (name, data)
            return dict(data)


async def test_events_stream_shows_loading_and_loaded(start_server):
    server = start_server(TWO_MODELS)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(server.url + "/api/v1/events") as events:
            assert events.status == 200
            assert events.headers["Content-Type"].startswith("text/event-stream")
            # The ": connected" comment means we are subscribed: nothing can be missed now.
            first = await asyncio.wait_for(events.content.readline(), 5)
            assert first.startswith(b":")
            async with session.post(server.url + "/api/v1/load",
                                    json={"model_name": "tone"}) as loaded:
                assert loaded.status == 200
                pid = (await loaded.json())["pid"]
            seen: list[dict[str, Any]] = []
            while not any(e["event"] == "loaded" for e in seen):
                seen.append(await asyncio.wait_for(_next_event(events), 5))
            async with session.post(server.url + "/api/v1/unload",
                                    json={"model_name": "tone"}) as unloaded:
                assert unloaded.status == 200
            while seen[-1]["event"] != "unloaded":
                seen.append(await asyncio.wait_for(_next_event(events), 5))
    names = [e["event"] for e in seen]
    assert names.index("loading") < names.index("loaded") < names.index("unloaded"), names
    assert all(e["model"] == "tone" for e in seen), seen
    loaded_event = seen[names.index("loaded")]
    assert loaded_event["pid"] == pid
    assert seen[-1]["reason"] == "manual" and seen[-1]["pid"] == pid


# ===================================================================== metrics, /api/ps


def _sample(metrics: str, name: str, labels: str = "") -> float | None:
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    match = re.search(pattern, metrics, re.MULTILINE)
    return None if match is None else float(match.group(1))


def test_metrics_count_loaded_models_and_evictions(start_server):
    server = start_server(TWO_MODELS)
    result = server.get("/metrics")
    assert result.status == 200
    assert result.headers["Content-Type"].startswith("text/plain")
    assert _sample(result.body.decode(), "lemonade_loaded_models") == 0.0

    server.load("tone")
    text = server.get("/metrics").body.decode()
    assert _sample(text, "lemonade_loaded_models") == 1.0
    assert _sample(text, "lemonade_loads_total", 'model="tone",outcome="success"') == 1.0
    # The default starts workers by forking from the kind's zygote, which the metrics show.
    assert _sample(text, "lemonade_worker_starts_total", 'how="fork",model="tone"') == 1.0
    assert (_sample(text, "lemonade_zygote_memory_bytes", 'kind="synthetic"') or 0) > 1e6

    assert server.post("/api/v1/unload", {"model_name": "tone"}).status == 200
    text = server.get("/metrics").body.decode()
    assert _sample(text, "lemonade_loaded_models") == 0.0
    assert 'lemonade_evictions_total{model="tone",reason="manual"} 1.0' in text.splitlines()


def test_api_ps_lists_the_loaded_model(start_server):
    server = start_server(TWO_MODELS)
    assert server.get("/api/ps").json() == {"models": []}
    server.load("tone")
    models = server.get("/api/ps").json()["models"]
    assert [m["name"] for m in models] == ["tone"]
    model = models[0]
    assert model["size"] > 16 * 1024 * 1024  # memory_mb = 16, measured
    assert model["size_vram"] == 0
    assert model["expires_at"] is not None
    assert model["expires_at"] == server.model("tone")["expires_at"]


# ===================================================================== health


def test_health_routes(start_server):
    server = start_server(TWO_MODELS)
    assert server.get("/health").json() == {"status": "ok"}
    health = server.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["all_models_loaded"] == []
    pid = server.load("tone")["pid"]
    health = server.get("/api/v1/health").json()
    assert health["model_loaded"] == "tone"
    assert [(m["model_name"], m["pid"]) for m in health["all_models_loaded"]] == [("tone", pid)]


# ===================================================================== security


def test_api_key_is_required_except_for_health(start_server):
    server = start_server(TWO_MODELS, env={"LEMONADE_API_KEY": "secret"})
    for path in ("/v1/models", "/api/v1/status", "/metrics"):
        result = server.get(path)
        assert result.status == 401, path
        assert result.headers["WWW-Authenticate"] == "Bearer"
        assert result.error["type"] == "authentication_error"
    wrong = server.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert wrong.status == 401
    no_scheme = server.get("/v1/models", headers={"Authorization": "secret"})
    assert no_scheme.status == 401
    load = server.post("/api/v1/load", {"model_name": "tone"})
    assert load.status == 401
    assert server.worker_pids() == []

    ok = server.get("/v1/models", headers={"Authorization": "Bearer secret"})
    assert ok.status == 200
    assert {m["id"] for m in ok.json()["data"]} == {"tone", "tone-2"}
    assert server.get("/health").status == 200
    # The key never shows up in the log.
    assert not any("secret" in line for line in server.log_lines)


def test_non_loopback_bind_without_key_refuses_to_start(tmp_path):
    config = tmp_path / "lemonade.toml"
    config.write_text(TWO_MODELS)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "serve", "--config", str(config),
         "--port", "0", "--host", "0.0.0.0"],
        capture_output=True, text=True, env=server_env(), cwd=tmp_path,
        timeout=STARTUP_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "LEMONADE_API_KEY" in output
    assert "0.0.0.0" in output
    assert "listening on" not in output
    assert time.monotonic() - started < STARTUP_TIMEOUT_S


def test_non_loopback_bind_with_key_starts(start_server):
    server = start_server(TWO_MODELS, env={"LEMONADE_API_KEY": "secret"},
                          args=["--host", "0.0.0.0"])
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    assert http("GET", url + "/v1/models").status == 401
    assert http("GET", url + "/v1/models",
                headers={"Authorization": "Bearer secret"}).status == 200


def test_loopback_server_answers_only_to_local_host_names(start_server):
    """DNS rebinding: a page served as evil.example that resolves to 127.0.0.1."""
    server = start_server(TWO_MODELS)
    port = server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert server.get("/v1/models", headers={"Host": host}).status == 200, host
    foreign = (f"evil.example:{port}", "evil.example", f"192.168.1.10:{port}", "127.0.0.1.nip.io")
    for host in foreign:
        result = server.get("/v1/models", headers={"Host": host})
        assert result.status == 403, (host, result.body)
        assert "Host" in result.error["message"]
    load = server.post("/api/v1/load", {"model_name": "tone"},
                       headers={"Host": f"rebind.evil.example:{port}"})
    assert load.status == 403
    assert server.worker_pids() == []


def test_cross_site_requests_are_refused(start_server):
    """A form POST from another site needs no preflight; it must not drive the API."""
    server = start_server(TWO_MODELS)
    body = json.dumps({"model_name": "tone"}).encode()
    for origin in ("https://evil.example", "null", "http://[oops", "http://127.0.0.1.evil.example"):
        result = server.post("/api/v1/load", data=body,
                             headers={"Origin": origin, "Content-Type": "text/plain"})
        assert result.status == 403, (origin, result.body)
        assert "origin" in result.error["message"].lower()
    assert server.worker_pids() == []
    assert server.status()["server"]["spawns"] == 0
    # A local web UI (another port on this machine) may.
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080"):
        result = server.get("/v1/models", headers={"Origin": origin})
        assert result.status == 200, (origin, result.body)
    assert server.load("tone")["state"] == "ready"


def test_loopback_origins_get_cors_headers_and_preflight_answers(start_server):
    """A local web UI on another port can read answers, errors included."""
    server = start_server(TWO_MODELS)
    origin = "http://localhost:3000"
    ok = server.get("/v1/models", headers={"Origin": origin})
    assert ok.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in ok.headers["Vary"]
    missing = server.post("/v1/audio/speech", {"model": "nope", "input": "hi"},
                          headers={"Origin": origin})
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] == origin
    preflight = server.request("OPTIONS", "/v1/audio/speech", headers={
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, bad header!",
    })
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"]
    assert "content-type" in allowed and "authorization" in allowed and "bad" not in allowed
    no_origin = server.get("/v1/models")
    assert "Access-Control-Allow-Origin" not in no_origin.headers
