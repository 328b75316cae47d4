"""The ``kokoro`` kind end to end: Kokoro-82M (random weights) in a real worker process.

What a user checks: the ``openai`` client gets 24 kHz audio of a plausible length in WAV and
FLAC, a streamed request sends its first sentence before the last one is synthesised, bad
input is a 400 naming the field and never costs the worker, a client that hangs up stops the
synthesis, the idle timer ends the process (and with it its ~1 GB of memory), and a missing
weights file is one clear load error rather than a crash loop.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave

import aiohttp
import openai
import psutil
import pytest
import soundfile as sf

from tests.e2e.conftest import Server, async_wait_for, pid_alive, pid_gone, wait_for

KOKORO = """
[server]
auto_unload_timer = "10m"
default_model = "kokoro"
[models.kokoro]
recipe = "kokoro"
max_concurrency = 2
[models.kokoro.options]
weights = "random"
voice = "af_heart"
"""
TWO_SENTENCES = "Hello there, this is the first sentence. And here comes the second one."


def wav_seconds(audio: bytes) -> float:
    with wave.open(io.BytesIO(audio), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        return wav.getnframes() / wav.getframerate()


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@pytest.mark.slow
def test_kokoro_speaks_streams_lists_voices_and_unloads_on_idle(start_server):
    server: Server = start_server(KOKORO)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=120) as client:
        whole = client.audio.speech.create(
            model="kokoro", voice="af_heart", input="Hello there.", response_format="wav"
        ).read()
        # Kokoro speaks ~12 phonemes a second; "Hello there." is ~0.5 to 1.5 s of audio.
        assert 0.3 < wav_seconds(whole) < 3.0

        flac = client.audio.speech.create(
            model="kokoro", voice="af_bella+af_sky", input="Hello there.",
            response_format="flac",
        ).read()
        samples, rate = sf.read(io.BytesIO(flac))
        assert rate == 24000 and 0.3 < len(samples) / rate < 3.0

        with pytest.raises(openai.BadRequestError) as err:
            client.audio.speech.create(model="kokoro", voice="af_nobody", input="Hi.")
        assert "af_nobody" in str(err.value) and "af_heart" in str(err.value)

    row = server.model("kokoro")
    pid = row["pid"]
    assert row["state"] == "ready" and pid_alive(pid)
    assert row["info"]["g2p"] in ("misaki+spacy", "espeak")
    assert row["info"]["parameters"] > 80_000_000  # the real Kokoro-82M architecture
    assert row["memory"]["rss_bytes"] > 500 * 2**20

    # Streaming: the first sentence's bytes arrive while the second is still being made.
    arrivals: list[float] = []
    body = b""
    started = time.monotonic()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=120) as client, client.audio.speech.with_streaming_response.create(
        model="kokoro", voice="af_heart", input=TWO_SENTENCES, response_format="wav",
        extra_body={"stream": True},
    ) as response:
        for piece in response.iter_bytes():
            arrivals.append(time.monotonic() - started)
            body += piece
    assert len(arrivals) > 1, "a two-sentence stream came in one piece"
    assert arrivals[-1] - arrivals[0] > 0.05, arrivals
    # A streamed WAV says "size unknown"; its samples are all there after the 44-byte header.
    assert body[:4] == b"RIFF"
    assert 1.5 < (len(body) - 44) / 2 / 24000 < 12

    voices = server.get("/v1/audio/voices?model=kokoro").json()
    assert "af_heart" in voices["voices"] and voices["default"] == "af_heart"
    assert server.model("kokoro")["pid"] == pid, "bad input and listing voices kept the worker"

    # The idle timer ends the process, and the memory goes with it.
    timeout = server.post("/api/v1/timeout", {"model_name": "kokoro", "idle_timeout": 1})
    assert timeout.status == 200, timeout.body
    wait_for(lambda: pid_gone(pid), 15, what="the idle timer to end the Kokoro worker")
    row = server.wait_state("kokoro", "unloaded")
    assert row["pid"] is None and row["memory"]["rss_bytes"] in (0, None)
    assert row["last_eviction"]["reason"] == "idle"
    assert not psutil.pid_exists(pid), "the worker was not reaped"


@pytest.mark.slow
async def test_kokoro_client_hanging_up_stops_the_synthesis(start_server):
    server = start_server(KOKORO)
    pid = (await asyncio.to_thread(server.load, "kokoro"))["pid"]
    long_text = " ".join(f"This is sentence number {i} of a long text." for i in range(30))
    async with aiohttp.ClientSession() as session, session.post(
        server.url + "/v1/audio/speech",
        json={"model": "kokoro", "input": long_text, "stream": True, "response_format": "pcm"},
    ) as response:
        assert response.status == 200
        assert await response.content.readany()
        response.close()  # hang up after the first sentence
    await async_wait_for(lambda: server.model("kokoro")["in_flight"] == 0, 10,
                         what="the abandoned request to be released")
    # The worker stops within a sentence or two: then its CPU time stops growing. Had it gone
    # on, the 30 sentences would keep it busy far longer than this window (~1 s each).
    deadline = time.monotonic() + 12.0
    burned = float("inf")
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(1.0)
        burned = cpu_seconds(pid) - before
        if burned < 0.3:
            break
    assert burned < 0.3, f"the worker still burned {burned:.1f}s of CPU a second, 12s after " \
                         "the client left"
    assert pid_alive(pid)


def test_kokoro_request_validation_needs_no_load(start_server):
    server = start_server(KOKORO)
    cases = [
        ({"input": ""}, "input"),
        ({"input": "x" * 5000}, "input"),
        ({"input": "Hi.", "response_format": "aiff"}, "response_format"),
        ({"input": "Hi.", "speed": 9}, "speed"),
        ({"input": "Hi.", "speed": "fast"}, "speed"),
        ({"input": "Hi.", "voice": 3}, "voice"),
    ]
    for fields, name in cases:
        result = server.post("/v1/audio/speech", {"model": "kokoro", **fields})
        assert result.status == 400, (fields, result.body)
        assert name in result.error["message"], (fields, result.error)
    assert server.worker_pids() == [], "bad requests must not load the model"


def test_missing_weights_file_is_one_clear_load_error(start_server, tmp_path):
    missing = tmp_path / "nowhere" / "kokoro-v1_0.pth"
    server = start_server(KOKORO.replace('weights = "random"', f'weights = "{missing}"'))
    first = server.speech("kokoro", "Hello.")
    assert first.status == 503
    message = first.error["message"]
    assert str(missing) in message and "weights" in message
    second = server.speech("kokoro", "Hello.")
    assert second.status == 503
    row = server.model("kokoro")
    assert row["state"] == "failed"
    assert row["failures"] == 1 and row["restarts"] == 0, "a recipe mistake is not retried"
    assert "Retry-After" in second.headers
