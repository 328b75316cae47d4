"""The seed systems' routes on ``default_model``, and ``GET /v1/audio/voices``.

A script written for Kokoro-FastAPI (``POST /dev/unload``) or TorchTS (``/model/*``) must get
the documented responses, and each route must act for real: an unload ends the worker
process, a timeout set here is the idle timer that then unloads the model.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import pid_alive, pid_gone

CONFIG = """
[server]
default_model = "tone"
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
[models.other]
recipe = "synthetic"
type = "tts"
"""


def test_model_status_follows_the_default_model(start_server):
    server = start_server(CONFIG)
    before = server.get("/model/status").json()
    assert before["model"] == "tone"
    assert before["model_loaded"] is False and before["is_loading"] is False
    assert before["unload_timeout"] == 600
    assert before["time_since_last_activity"] is None
    assert before["gpu_memory_allocated"] == 0

    assert server.speech("tone").status == 200
    after = server.get("/model/status").json()
    assert after["model_loaded"] is True
    assert after["device"] == "cpu"
    assert 0 <= after["time_since_last_activity"] < 5
    assert after["memory_rss_bytes"] > 0
    assert set(after) >= {"model_loaded", "device", "unload_timeout", "time_since_last_activity",
                          "is_loading", "available_languages", "gpu_memory_allocated",
                          "gpu_memory_reserved"}


def test_dev_unload_ends_the_worker_and_the_next_request_reloads(start_server):
    server = start_server(CONFIG)
    pid = server.load("tone")["pid"]
    result = server.post("/dev/unload")
    assert (result.status, result.json()) == (200, {"status": "unloaded"})
    assert pid_gone(pid)
    assert server.model("tone")["last_eviction"]["reason"] == "manual"
    # Unloading what is not loaded is still a success (scripts call it blindly).
    assert server.post("/dev/unload").json() == {"status": "unloaded"}
    reply = server.speech("tone")
    assert reply.status == 200
    new_pid = int(reply.headers["X-Lemonade-Worker-Pid"])
    assert new_pid != pid and pid_alive(new_pid)


def test_model_unload_message_and_process_exit(start_server):
    server = start_server(CONFIG)
    pid = server.load("tone")["pid"]
    other = server.load("other")["pid"]
    result = server.post("/model/unload")
    assert (result.status, result.json()) == (200, {"message": "Model unloaded successfully"})
    assert pid_gone(pid)
    assert pid_alive(other), "only the default model is unloaded"


def test_model_timeout_sets_the_idle_timer_with_a_one_minute_floor(start_server):
    server = start_server(CONFIG)
    too_short = server.post("/model/timeout", {"timeout_seconds": 30})
    assert too_short.status == 400
    assert "timeout_seconds" in too_short.error["message"]
    missing = server.post("/model/timeout", {})
    assert missing.status == 400 and "timeout_seconds" in missing.error["message"]
    wrong_type = server.post("/model/timeout", {"timeout_seconds": "600"})
    assert wrong_type.status == 400 and "number" in wrong_type.error["message"]

    ok = server.post("/model/timeout", {"timeout_seconds": 600})
    assert (ok.status, ok.json()) == (200, {"message": "Timeout updated to 600 seconds"})
    server.load("tone")
    row = server.model("tone")
    assert row["idle_timeout_s"] == 600
    assert row["expires_at"] is not None
    assert server.get("/model/status").json()["unload_timeout"] == 600
    # It is tone's own runtime timeout, not a new global one.
    assert row["idle_timeout_source"] != server.model("other")["idle_timeout_source"]


def test_routes_without_a_default_model_are_503_naming_the_setting(start_server):
    server = start_server("""
        [models.tone]
        recipe = "synthetic"
        type = "tts"
    """)
    for method, path in (("POST", "/dev/unload"), ("GET", "/model/status"),
                         ("POST", "/model/unload")):
        result = server.request(method, path, data=b"" if method == "POST" else None)
        assert result.status == 503, (path, result.body)
        assert "default_model" in result.error["message"]


def test_voices_lists_what_the_worker_has(start_server):
    server = start_server(CONFIG)
    result = server.get("/v1/audio/voices?model=other")
    assert result.status == 200, result.body
    data = result.json()
    assert data["model"] == "other"
    assert data["voices"] == ["high", "low", "tone"] and data["default"] == "tone"
    assert [v["id"] for v in data["data"]] == data["voices"]
    # Without ?model= the default model answers.
    assert server.get("/v1/audio/voices").json()["model"] == "tone"


def test_voices_of_a_model_that_is_not_loaded_do_not_load_it(start_server):
    server = start_server(CONFIG)
    data = server.get("/v1/audio/voices?model=other").json()
    assert data["loaded"] is False and data["voices"] == ["high", "low", "tone"]
    assert server.worker_pids() == []
    assert server.model("other")["state"] == "unloaded"
    # Once it is loaded its worker answers, with the same list.
    server.load("other")
    pid = server.model("other")["pid"]
    loaded = server.get("/v1/audio/voices?model=other").json()
    assert loaded["loaded"] is True and loaded["voices"] == data["voices"]
    assert server.worker_pids() == [pid]


@pytest.mark.parametrize(("query", "status", "words"), [
    ("?model=nope", 404, "nope"),
    ("?model=../etc", 404, "../etc"),
])
def test_voices_for_unknown_models(start_server, query, status, words):
    server = start_server(CONFIG)
    result = server.get("/v1/audio/voices" + query)
    assert result.status == status
    assert words in result.error["message"]
    assert server.worker_pids() == []


def test_voices_needs_a_model_when_there_is_no_default(start_server):
    server = start_server("""
        [models.a]
        recipe = "synthetic"
        type = "tts"
        [models.b]
        recipe = "synthetic"
        type = "tts"
    """)
    result = server.get("/v1/audio/voices")
    assert result.status == 400
    assert "'model'" in result.error["message"] and "a, b" in result.error["message"]
    assert server.worker_pids() == []
