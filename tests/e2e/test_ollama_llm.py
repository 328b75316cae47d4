"""Ollama's ``/api/chat`` and ``/api/generate`` end to end on the real SmolLM2-135M-Instruct,
with the official ``ollama`` client and raw bytes.

What an Ollama user checks: a stream is NDJSON (one JSON object per ``\\n``-terminated line,
the last with ``done: true``, the counts and the nanosecond durations) and really streams;
``stream: false`` is one object with the same fields; ``options`` do what they say
(``num_predict``, ``stop``, ``seed``, ``temperature``); ``system`` and ``raw`` on generate
change the prompt as Ollama's do; a request with nothing to generate loads the model
(``done_reason: "load"``) and with ``keep_alive: 0`` unloads it (the worker process ends).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import ollama
import pytest

from tests.e2e.conftest import (
    Server,
    async_wait_for,
    module_server,
    pid_alive,
    pid_gone,
    wait_for,
)
from tests.helpers import shared_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.smol]
recipe = "llm"
type = "llm"
max_concurrency = 1
"""
LOAD_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 120.0
SHORT = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Name a colour."}]
GREEDY = {"temperature": 0, "num_predict": 6}
FINAL_FIELDS = {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, CONFIG, "ollama-llm", load=("smol",),
                             load_timeout_s=LOAD_TIMEOUT_S, shared_data=True)


@pytest.fixture
def client(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=CALL_TIMEOUT_S) as client:
        yield client


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    """Byte-level NDJSON: every object on its own ``\\n``-terminated line, nothing else."""
    assert raw.endswith(b"\n"), raw[-200:]
    lines = raw.split(b"\n")[:-1]
    assert lines and all(line.strip() == line and line for line in lines), raw[:500]
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objects)
    return objects


def check_final(final: dict[str, Any], *, max_eval: int | None = None) -> None:
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    assert FINAL_FIELDS <= set(final), final
    assert all(type(final[k]) is int and final[k] >= 0 for k in FINAL_FIELDS), final
    assert final["prompt_eval_count"] > 5 and final["eval_count"] >= 1
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["eval_duration"] > 0 and final["prompt_eval_duration"] > 0
    if max_eval is not None:
        assert final["eval_count"] <= max_eval


# ===================================================================== streams, byte level


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
def test_raw_stream_is_ndjson_ending_with_done(server: Server, route: str) -> None:
    body: dict[str, Any] = {"model": "smol", "options": GREEDY}
    body.update({"messages": SHORT} if route == "/api/chat" else {"prompt": "Name a colour."})
    result = server.post(route, body, timeout=CALL_TIMEOUT_S)
    assert result.status == 200, result.body[:300]
    assert result.headers["Content-Type"].startswith("application/x-ndjson")
    assert result.headers["X-Lemonade-Worker-Pid"].isdigit()
    objects = ndjson(result.body)
    pieces, final = objects[:-1], objects[-1]
    assert len(pieces) > 1, "the answer came in one piece"
    assert all(o["done"] is False and o["model"] == "smol" and o["created_at"] for o in pieces)
    assert all("done_reason" not in o for o in pieces)
    if route == "/api/chat":
        assert all(o["message"]["role"] == "assistant" for o in objects)
        text = "".join(o["message"]["content"] for o in pieces)
        assert final["message"]["content"] == ""
    else:
        text = "".join(o["response"] for o in pieces)
        assert final["response"] == ""
    assert text.strip()
    check_final(final, max_eval=6)


def test_stream_false_is_one_object(server: Server) -> None:
    result = server.post("/api/generate", {"model": "smol", "prompt": "Name a colour.",
                                           "stream": False, "options": GREEDY},
                         timeout=CALL_TIMEOUT_S)
    assert result.status == 200, result.body[:300]
    assert result.headers["Content-Type"].startswith("application/json")
    whole = result.json()
    assert whole["response"].strip() and "context" not in whole
    check_final(whole, max_eval=6)


# ===================================================================== the official client


def test_client_chat_whole_and_streamed_agree(client: ollama.Client) -> None:
    whole = client.chat(model="smol", messages=SHORT, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.done and whole.eval_count is not None and whole.eval_count <= 6
    parts = list(client.chat(model="smol", messages=SHORT, options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_client_generate_whole_and_streamed_agree(client: ollama.Client) -> None:
    whole = client.generate(model="smol", prompt="Name a colour.", options=GREEDY)
    assert whole.response and whole.done_reason in ("stop", "length")
    parts = list(client.generate(model="smol", prompt="Name a colour.", options=GREEDY,
                                 stream=True))
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count
    assert "".join(p.response or "" for p in parts) == whole.response


def test_generate_is_the_chat_template_with_an_optional_system(client: ollama.Client) -> None:
    """Ollama formats a (non-raw) prompt as a user turn, after ``system`` if given."""
    options = {"temperature": 0, "num_predict": 8}
    generated = client.generate(model="smol", prompt="Name a colour.", system="Be brief.",
                                options=options)
    chatted = client.chat(model="smol", messages=SHORT, options=options)
    assert generated.response == chatted.message.content
    assert generated.prompt_eval_count == chatted.prompt_eval_count
    raw = client.generate(model="smol", prompt="Name a colour.", raw=True, options=options)
    assert raw.prompt_eval_count is not None and generated.prompt_eval_count is not None
    assert raw.prompt_eval_count < generated.prompt_eval_count  # no template around it


# ===================================================================== options


def test_num_predict_caps_the_answer(client: ollama.Client) -> None:
    answer = client.generate(model="smol", prompt="Count from one to fifty:",
                             options={"temperature": 0, "num_predict": 3})
    assert answer.eval_count == 3 and answer.done_reason == "length"
    unlimited = client.generate(model="smol", prompt="Say hi.",
                                options={"temperature": 0, "num_predict": -1})
    assert unlimited.done_reason in ("stop", "length")


def test_stop_ends_before_the_stop_string(client: ollama.Client) -> None:
    free = client.generate(model="smol", prompt="Count: 1, 2, 3,", raw=True,
                           options={"temperature": 0, "num_predict": 12})
    assert "5" in free.response, free.response
    stopped = client.generate(model="smol", prompt="Count: 1, 2, 3,", raw=True,
                              options={"temperature": 0, "num_predict": 12, "stop": ["5"]})
    assert "5" not in stopped.response and stopped.done_reason == "stop"
    assert free.response.startswith(stopped.response)


def test_seed_repeats_a_sampled_answer_and_unknown_options_are_ignored(
        client: ollama.Client) -> None:
    options = {"temperature": 1.0, "top_p": 0.95, "top_k": 40, "seed": 7, "num_predict": 10,
               "repeat_penalty": 1.1, "num_ctx": 4096, "mirostat": 0, "no_such_option": 1}
    first = client.generate(model="smol", prompt="Tell me a story.", options=options)
    again = client.generate(model="smol", prompt="Tell me a story.", options=options)
    assert first.response == again.response


# ===================================================================== load / unload idioms


def test_nothing_to_generate_loads_and_keep_alive_0_unloads(start_server: Any,
                                                            tmp_path_factory: Any) -> None:
    env = {"LEMONADE_DATA_DIR": str(shared_data_dir(tmp_path_factory))}
    server = start_server(CONFIG, env=env)
    with ollama.Client(host=server.url, timeout=LOAD_TIMEOUT_S) as client:
        loaded = client.generate(model="smol")
        assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
        row = server.model("smol")
        assert row["state"] == "ready" and pid_alive(row["pid"])
        pid = row["pid"]
        chat_loaded = client.chat(model="smol", messages=[])
        assert chat_loaded.done_reason == "load" and chat_loaded.message.content == ""
        assert server.model("smol")["pid"] == pid  # already resident: the same worker
        assert [m.model for m in client.ps().models] == ["smol"]

        unloaded = client.chat(model="smol", messages=[], keep_alive=0)
        assert unloaded.done and unloaded.done_reason == "unload"
        wait_for(lambda: pid_gone(pid), 15, what=f"worker {pid} to exit")
        row = server.model("smol")
        assert row["state"] == "unloaded" and row["last_eviction"]["reason"] == "keep_alive_0"
        assert client.ps().models == []

        again = client.generate(model="smol", keep_alive="10m")
        assert again.done_reason == "load"
        pid = server.model("smol")["pid"]
        gone = client.generate(model="smol", keep_alive=0)
        assert gone.done_reason == "unload"
        wait_for(lambda: pid_gone(pid), 15, what=f"worker {pid} to exit")


# ===================================================================== hang-ups and breaks


async def test_client_hanging_up_stops_the_generation(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.url + "/api/generate", json={
            "model": "smol", "prompt": "Tell me a long story.",
            "options": {"num_predict": 2000, "temperature": 0.7}})
        assert response.status == 200
        seen = b""
        while seen.count(b"\n") < 2:
            seen += await response.content.readany()
        response.close()
    # max_concurrency is 1: had the abandoned generation gone on, this would queue behind it.
    started = time.monotonic()
    quick = await asyncio.to_thread(server.post, "/api/generate", {
        "model": "smol", "prompt": "Hi", "stream": False, "options": {"num_predict": 1}},
        timeout=CALL_TIMEOUT_S)
    assert quick.status == 200 and quick.json()["eval_count"] == 1
    took = time.monotonic() - started
    assert took < 45, f"the next request took {took:.1f}s: the abandoned one kept generating"
    await async_wait_for(lambda: server.model("smol")["in_flight"] == 0, 5,
                         what="the abandoned request to be released")


def test_worker_dying_mid_stream_ends_it_with_an_error_line(server: Server) -> None:
    """Last in the module: it leaves smol unloaded."""
    pid = server.model("smol")["pid"]

    async def run() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/api/chat", json={
                    "model": "smol", "messages": SHORT,
                    "options": {"num_predict": 2000}}) as response:
                assert response.status == 200
                seen = await response.content.readany()
                os.kill(pid, signal.SIGKILL)
                return seen + await response.read()

    lines = ndjson(asyncio.run(run()))
    assert all(line.get("done") is False for line in lines[:-1])
    assert set(lines[-1]) == {"error"} and lines[-1]["error"], lines[-1]
    wait_for(lambda: server.model("smol")["state"] == "unloaded", 10, what="smol unloaded")
    assert server.model("smol")["last_eviction"]["reason"] == "crash"
