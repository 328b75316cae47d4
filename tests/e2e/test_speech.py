"""``/v1/audio/speech`` end to end: a real server, real workers, real HTTP clients.

What a user checks: the official ``openai`` client gets playable audio, streaming really
streams, status tells the truth about the worker (pid, memory, idle timeout and where it came
from), idle timers and ``keep_alive`` really end the process, concurrent cold requests share
one load, a crashed worker costs one request, and bad input is a 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest

from tests.e2e.conftest import (
    MIB,
    HttpResult,
    Server,
    async_wait_for,
    launch_server,
    pid_alive,
    pid_gone,
)

TONE = """
[server]
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
idle_timeout = "10m"
[models.tone.options]
latency_ms = 0
[models.tone-2]
recipe = "synthetic"
type = "tts"
"""


def parse_wav(audio: bytes) -> tuple[wave._wave_params, float]:
    with wave.open(io.BytesIO(audio), "rb") as wav:
        params = wav.getparams()
        frames = wav.readframes(params.nframes)
    assert len(frames) == params.nframes * params.sampwidth * params.nchannels
    return params, params.nframes / params.framerate


def assert_tone_wav(audio: bytes, min_seconds: float = 0.3) -> float:
    params, seconds = parse_wav(audio)
    assert params.framerate == 24000
    assert params.nchannels == 1
    assert params.sampwidth == 2
    assert seconds > min_seconds
    return seconds


# ===================================================================== the openai client


def test_openai_client_gets_wav_whole_and_streamed(start_server):
    server = start_server(TONE)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        ids = {m.id for m in client.models.list()}
        assert ids == {"tone", "tone-2"}

        whole = client.audio.speech.create(
            model="tone", voice="tone", input="Hello there", response_format="wav"
        ).read()
        seconds = assert_tone_wav(whole)

        with client.audio.speech.with_streaming_response.create(
            model="tone", voice="tone", input="Hello there", response_format="wav"
        ) as response:
            assert response.headers["content-type"].startswith("audio/wav")
            streamed = b"".join(response.iter_bytes())
    assert parse_wav(streamed)[0] == parse_wav(whole)[0]
    assert assert_tone_wav(streamed) == seconds


def test_openai_client_sees_errors_as_api_errors(start_server):
    server = start_server(TONE)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as info:
            client.audio.speech.create(model="nope", voice="tone", input="hi")
        assert "nope" in str(info.value)
        with pytest.raises(openai.BadRequestError) as info:
            client.audio.speech.create(model="tone", voice="nobody", input="hi")
        assert "nobody" in str(info.value)


# ===================================================================== streaming


async def test_stream_true_arrives_in_several_pieces(start_server):
    server = start_server("""
        [models.tone]
        recipe = "synthetic"
        type = "tts"
        [models.tone.options]
        chunks = 4
        latency_ms = 400
    """)
    await asyncio.to_thread(server.load, "tone")  # time the stream, not the load
    arrivals: list[tuple[float, int]] = []
    audio = b""
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(server.url + "/v1/audio/speech", json={
            "model": "tone", "input": "Hello there, streaming world", "stream": True,
        }) as response:
            assert response.status == 200
            assert response.headers.get("Transfer-Encoding", "").lower() == "chunked"
            async for piece in response.content.iter_any():
                arrivals.append((time.monotonic() - started, len(piece)))
                audio += piece
    assert len(arrivals) > 1, arrivals
    first, last = arrivals[0][0], arrivals[-1][0]
    # Four chunks 100 ms apart: the first bytes come ~0.3 s before the last ones.
    assert last - first > 0.15, arrivals
    assert_tone_wav(audio)


# ===================================================================== status and idle timers


def test_status_tells_pid_memory_and_timeout_then_idle_unload(start_server):
    server = start_server("""
        [server]
        auto_unload_timer = "10m"
        [models.tone]
        recipe = "synthetic"
        type = "tts"
        idle_timeout = "1s"
        [models.tone.options]
        memory_mb = 64
    """)
    result = server.speech("tone")
    done = time.monotonic()
    assert result.status == 200, result.body
    assert_tone_wav(result.body)
    row = server.model("tone")
    assert row["state"] == "ready"
    pid = row["pid"]
    assert isinstance(pid, int) and pid_alive(pid)
    assert pid in server.worker_pids()
    assert str(pid) == result.headers["X-Lemonade-Worker-Pid"]
    assert row["memory"]["rss_bytes"] >= 64 * MIB
    assert row["idle_timeout_s"] == 1.0
    assert "recipe" in row["idle_timeout_source"]
    assert str(server.config_path) in row["idle_timeout_source"]
    assert row["expires_at"] is not None

    row = server.wait_state("tone", "unloaded", timeout=6)
    waited = time.monotonic() - done
    assert 0.7 < waited < 5, waited
    assert row["last_eviction"]["reason"] == "idle"
    assert row["pid"] is None
    assert pid_gone(pid)
    assert server.worker_pids() == []
    assert any("unloaded (idle)" in line for line in server.log_lines)


def test_global_timer_from_env_unloads(start_server):
    server = start_server("""
        [models.tone]
        recipe = "synthetic"
        type = "tts"
    """, env={"LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER": "1s"})
    assert server.speech("tone").status == 200
    done = time.monotonic()
    row = server.model("tone")
    assert row["state"] == "ready"
    pid = row["pid"]
    assert row["idle_timeout_s"] == 1.0
    assert "LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER" in row["idle_timeout_source"]
    status = server.status()["server"]
    assert status["auto_unload_timer_s"] == 1.0
    assert "LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER" in status["auto_unload_timer_source"]

    row = server.wait_state("tone", "unloaded", timeout=6)
    assert 0.7 < time.monotonic() - done < 5
    assert row["last_eviction"]["reason"] == "idle"
    assert pid_gone(pid)


def test_keep_alive_zero_unloads_right_after(start_server):
    server = start_server(TONE)
    result = server.speech("tone", keep_alive=0)
    assert result.status == 200, result.body
    assert_tone_wav(result.body)
    pid = int(result.headers["X-Lemonade-Worker-Pid"])
    # The recipe says 10 minutes; only keep_alive 0 can unload it this fast.
    row = server.wait_state("tone", "unloaded", timeout=2)
    assert row["last_eviction"]["reason"] == "keep_alive_0"
    assert pid_gone(pid)
    # The same for a streamed answer.
    streamed = server.speech("tone", keep_alive=0, stream=True)
    assert streamed.status == 200
    assert_tone_wav(streamed.body)
    assert int(streamed.headers["X-Lemonade-Worker-Pid"]) != pid
    row = server.wait_state("tone", "unloaded", timeout=2)
    assert row["last_eviction"]["reason"] == "keep_alive_0"
    assert server.worker_pids() == []


def test_keep_alive_duration_sets_request_timeout(start_server):
    server = start_server(TONE)
    assert server.speech("tone", keep_alive="10m").status == 200
    row = server.model("tone")
    assert row["state"] == "ready"
    assert row["idle_timeout_s"] == 600
    assert row["idle_timeout_source"] == "request"
    # A later request without keep_alive keeps the request's value (Ollama semantics).
    assert server.speech("tone").status == 200
    assert server.model("tone")["idle_timeout_s"] == 600
    # ttl (seconds) is the other spelling.
    assert server.speech("tone", ttl=30).status == 200
    row = server.model("tone")
    assert (row["idle_timeout_s"], row["idle_timeout_source"]) == (30, "request")


# ===================================================================== concurrency


async def test_concurrent_cold_requests_share_one_load(start_server):
    server = start_server("""
        [models.tone]
        recipe = "synthetic"
        type = "tts"
        [models.tone.options]
        load_seconds = 0.5
        latency_ms = 50
    """)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> tuple[int, str, bytes]:
            async with session.post(server.url + "/v1/audio/speech",
                                    json={"model": "tone", "input": f"request {i}"}) as r:
                return r.status, r.headers.get("X-Lemonade-Worker-Pid", ""), await r.read()

        results = await asyncio.gather(*(one(i) for i in range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    assert len({pid for _, pid, _ in results}) == 1
    for _, _, body in results:
        assert_tone_wav(body, min_seconds=0.1)
    status = await asyncio.to_thread(server.status)
    assert status["server"]["spawns"] == 1
    assert len(await asyncio.to_thread(server.worker_pids)) == 1


# ===================================================================== a worker crash


async def test_sigkilled_worker_costs_one_request_then_reloads(start_server):
    server = start_server("""
        [models.tone]
        recipe = "synthetic"
        type = "tts"
        [models.tone.options]
        latency_ms = 3000
        chunks = 30
    """)
    loaded = await asyncio.to_thread(server.load, "tone")
    old_pid = loaded["pid"]
    async with aiohttp.ClientSession() as session:

        async def speak() -> tuple[int, bytes]:
            async with session.post(server.url + "/v1/audio/speech",
                                    json={"model": "tone", "input": "a long answer"}) as r:
                return r.status, await r.read()

        in_flight = asyncio.create_task(speak())
        await async_wait_for(lambda: server.model("tone")["in_flight"] == 1, 5,
                             what="the request to reach the worker")
        os.kill(old_pid, signal.SIGKILL)
        status, body = await asyncio.wait_for(in_flight, 10)

    assert status == 502, body
    error = HttpResult(status, None, body).error  # type: ignore[arg-type]
    assert "tone" in error["message"]
    assert server.alive()
    assert server.get("/health").status == 200
    row = server.wait_state("tone", "unloaded", timeout=5)
    assert row["last_eviction"]["reason"] == "crash"
    assert row["restarts"] >= 1

    again = server.speech("tone")
    assert again.status == 200, again.body
    assert_tone_wav(again.body)
    new_pid = int(again.headers["X-Lemonade-Worker-Pid"])
    assert new_pid != old_pid
    row = server.model("tone")
    assert (row["state"], row["pid"]) == ("ready", new_pid)
    assert row["restarts"] >= 1
    assert pid_gone(old_pid)


# ===================================================================== bad input

VALID = {"model": "tone", "input": "hello"}
BIG = {"model": "tone", "input": "x" * 4097}


def _raw(value: object) -> bytes:
    return json.dumps(value).encode()


# (id, body bytes, expected status, words the message must contain)
BAD_BODIES = [
    ("truncated-json", b'{"model": "tone", "input": "hel', 400, ["JSON"]),
    ("nan-speed", b'{"model": "tone", "input": "hello", "speed": NaN}', 400, ["NaN"]),
    ("array-body", _raw([VALID]), 400, ["object", "array"]),
    ("empty-body", b"", 400, ["empty"]),
    ("input-missing", _raw({"model": "tone"}), 400, ["input"]),
    ("input-empty", _raw({"model": "tone", "input": ""}), 400, ["input"]),
    ("input-not-string", _raw({"model": "tone", "input": 42}), 400, ["input", "string"]),
    ("input-list", _raw({"model": "tone", "input": ["a"]}), 400, ["input"]),
    ("speed-too-fast", _raw({**VALID, "speed": 10}), 400, ["speed"]),
    ("speed-string", _raw({**VALID, "speed": "fast"}), 400, ["speed"]),
    ("format-unknown", _raw({**VALID, "response_format": "xyz"}), 400, ["response_format"]),
    ("stream-not-bool", _raw({**VALID, "stream": "yes"}), 400, ["stream"]),
    ("keep-alive-bad", _raw({**VALID, "keep_alive": "soon"}), 400, ["keep_alive"]),
    ("input-too-long", _raw(BIG), 400, ["input", "4096"]),
    ("model-missing", _raw({"input": "hello"}), 400, ["model"]),
    ("model-traversal", _raw({**VALID, "model": "../etc/passwd"}), 400, ["model"]),
    ("model-unknown", _raw({**VALID, "model": "no-such-model"}), 404, ["no-such-model"]),
    ("duplicate-key", b'{"model": "tone", "model": "tone", "input": "hi"}', 400, ["model"]),
    ("body-over-1MiB", _raw({**VALID, "input": "y" * (MIB + 1000)}), 413, ["large"]),
]


@pytest.fixture(scope="module")
def validation_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the bad-input cases: none of them may ever reach a worker."""
    server = launch_server(TONE, Path(tmp_path_factory.mktemp("validation")))
    try:
        yield server
        assert server.alive(), server.log_text()
        assert server.get("/health").status == 200
        assert server.status()["server"]["spawns"] == 0
        assert not any("this is a bug" in line for line in server.log_lines), server.log_text()
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.mark.parametrize(("body", "status", "words"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
def test_bad_speech_body_is_a_4xx_naming_the_problem(validation_server, body, status, words):
    result = validation_server.post("/v1/audio/speech", data=body)
    assert result.status == status, result.body[:300]
    error = result.error
    for word in words:
        assert word.lower() in error["message"].lower(), error
    assert error["type"] == "invalid_request_error"
    assert validation_server.alive()


@pytest.mark.parametrize(("method", "path", "status", "words"), [
    ("GET", "/v1/no/such/route", 404, ["/v1/no/such/route"]),
    ("POST", "/nothing-here", 404, ["/nothing-here"]),
    ("GET", "/v1/audio/speech", 405, ["GET", "/v1/audio/speech"]),
    ("PUT", "/api/v1/load", 405, ["PUT"]),
], ids=["unknown-route", "unknown-post-route", "get-on-post-route", "put-on-post-route"])
def test_routing_errors_are_json(validation_server, method, path, status, words):
    result = validation_server.request(method, path, data=b"{}" if method != "GET" else None)
    assert result.status == status
    assert result.headers["Content-Type"].startswith("application/json")
    error = result.error
    for word in words:
        assert word in error["message"], error


def test_worker_side_bad_input_keeps_the_worker(start_server):
    server = start_server(TONE)
    first = server.speech("tone")
    assert first.status == 200
    pid = int(first.headers["X-Lemonade-Worker-Pid"])

    unknown_voice = server.speech("tone", voice="nobody")
    assert unknown_voice.status == 400, unknown_voice.body
    error = unknown_voice.error
    assert "nobody" in error["message"] and "voice" in error["message"]

    # A format the supervisor accepts but this worker kind cannot produce: 4xx, not 500.
    mp3 = server.speech("tone", response_format="mp3")
    assert 400 <= mp3.status < 500, mp3.body
    assert "mp3" in mp3.error["message"]

    again = server.speech("tone", voice="low")
    assert again.status == 200
    assert_tone_wav(again.body)
    assert int(again.headers["X-Lemonade-Worker-Pid"]) == pid
    row = server.model("tone")
    assert (row["state"], row["pid"], row["restarts"]) == ("ready", pid, 0)
    assert server.alive()
    assert not any("this is a bug" in line for line in server.log_lines)


def test_speech_on_unknown_and_bad_model_names_never_spawns(start_server):
    server = start_server(TONE)
    for name, status in [("../../bin/sh", 400), ("tone/../x", 400), ("a" * 200, 400),
                         ("ghost", 404)]:
        result = server.speech(name)
        assert result.status == status, (name, result.body)
        assert result.error
    assert server.status()["server"]["spawns"] == 0
    assert psutil.Process(server.pid).children() == []


# ===================================================================== failures while streaming


STREAMING = """
[models.tone]
recipe = "synthetic"
type = "tts"
max_concurrency = 1
[models.tone.options]
latency_ms = 3000
chunks = 30
"""


async def _hang_up_mid_stream(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.url + "/v1/audio/speech", json={
            "model": "tone", "input": "a long streamed answer", "stream": True})
        assert response.status == 200
        assert await response.content.readany()
        response.close()  # hang up after the first piece
    await async_wait_for(lambda: server.model("tone")["in_flight"] == 0, 2,
                         what="the abandoned request to be released")


async def test_client_leaving_a_stream_early_frees_the_model(start_server):
    server = start_server(STREAMING)
    pid = (await asyncio.to_thread(server.load, "tone"))["pid"]
    await _hang_up_mid_stream(server)
    row = await asyncio.to_thread(server.model, "tone")
    assert (row["state"], row["pid"], row["in_flight"]) == ("ready", pid, 0)
    assert row["expires_at"] is not None  # the idle timer runs again
    assert server.alive()


@pytest.mark.slow
async def test_client_leaving_a_stream_cancels_the_call_in_the_worker(start_server):
    server = start_server(STREAMING)
    pid = (await asyncio.to_thread(server.load, "tone"))["pid"]
    await _hang_up_mid_stream(server)
    started = time.monotonic()
    result = await asyncio.to_thread(server.speech, "tone", "short")
    took = time.monotonic() - started
    assert result.status == 200
    assert int(result.headers["X-Lemonade-Worker-Pid"]) == pid
    # One call at a time (max_concurrency 1), 3 s each: had the abandoned call kept running,
    # this one would have waited for it (~5.7 s in all).
    assert took < 4.5, f"the next call took {took:.1f}s: the abandoned call kept the worker busy"


async def test_worker_crash_mid_stream_truncates_the_transfer(start_server):
    server = start_server(STREAMING)
    pid = (await asyncio.to_thread(server.load, "tone"))["pid"]
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/audio/speech", json={
                "model": "tone", "input": "a long streamed answer", "stream": True}) as response:
            assert response.status == 200
            first = await response.content.readany()
            assert first.startswith(b"RIFF")
            os.kill(pid, signal.SIGKILL)
            # A complete-looking short file would be a lie: the transfer must fail.
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    row = server.wait_state("tone", "unloaded", timeout=5)
    assert row["last_eviction"]["reason"] == "crash"
    assert row["restarts"] == 1
    assert server.get("/health").status == 200


def test_failing_load_is_503_with_retry_after(start_server):
    server = start_server("""
        [server]
        load_failure_cooldown = "1s"
        [models.broken]
        recipe = "synthetic"
        type = "tts"
        [models.broken.options]
        fail_load = "weights are missing"
    """)
    first = server.speech("broken")
    assert first.status == 503, first.body
    assert int(first.headers["Retry-After"]) >= 1
    assert "weights are missing" in first.error["message"]
    row = server.model("broken")
    assert row["state"] == "failed"
    assert "weights are missing" in row["last_error"]
    assert row["retry_after_s"] >= 1
    spawns = server.status()["server"]["spawns"]
    # Inside the cooldown: refused at once, no new process.
    second = server.speech("broken")
    assert second.status == 503
    assert "Retry-After" in second.headers
    assert server.status()["server"]["spawns"] == spawns
    assert server.worker_pids() == []
    assert server.alive()


def test_keep_alive_negative_means_never(start_server):
    server = start_server(TONE)
    assert server.speech("tone", keep_alive=-1).status == 200
    row = server.model("tone")
    assert (row["idle_timeout_s"], row["idle_timeout_source"]) == (None, "request")
    assert row["expires_at"] is None
