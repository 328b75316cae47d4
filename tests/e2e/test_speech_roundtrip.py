"""Speech out and back in through a real server: ``kokoro-onnx`` speaks, ``asr`` listens.

The round trip is the end-to-end proof that both kinds are real: Kokoro-82M (int8 ONNX)
turns a sentence into audio through ``/v1/audio/speech``, whisper tiny.en turns that audio
back into text through ``/v1/audio/transcriptions``, both with the official ``openai``
client, and most of the words survive. Streaming is checked from the client's side: the
answer arrives in pieces and the first piece comes well before the last.

One server for the module, with both models loaded in the fixture (before the per-test leak
guard looks) and kept loaded to the end.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import soundfile as sf

from tests.e2e.conftest import Server, launch_server

CONFIG = """
[server]
auto_unload_timer = "never"
[models.kokoro-onnx]
recipe = "kokoro-onnx"
device = "cpu"
warmup = true
[models.kokoro-onnx.options]
threads = 2
[models.whisper]
recipe = "asr"
device = "cpu"
warmup = true
[models.whisper.options]
threads = 2
beam_size = 1
"""

SENTENCE = "Please bring the green umbrella to the station before seven."

pytestmark = pytest.mark.slow


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch_server(CONFIG, Path(tmp_path_factory.mktemp("roundtrip")))
    try:
        server.load("kokoro-onnx")
        server.load("whisper")
        yield server
        assert server.alive(), server.log_text()
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=120) as c:
        yield c


def test_spoken_words_come_back_as_text(server: Server, client: openai.OpenAI) -> None:
    audio = client.audio.speech.create(model="kokoro-onnx", voice="jf_alpha", input=SENTENCE,
                                       response_format="flac").read()
    samples, rate = sf.read(io.BytesIO(audio))
    assert rate == 24000 and 1.5 < len(samples) / rate < 8.0
    heard = client.audio.transcriptions.create(
        model="whisper", file=("speech.flac", audio, "audio/flac"), language="en")
    said = words(SENTENCE)
    got = set(words(heard.text))
    matched = [w for w in said if w in got]
    assert len(matched) >= 0.7 * len(said), (heard.text, SENTENCE)
    for name in ("kokoro-onnx", "whisper"):  # both ran their warmup op after loading
        row = server.model(name)
        assert row["state"] == "ready" and row["info"]["warmup_seconds"] > 0, row


def test_streamed_speech_arrives_in_pieces_before_it_is_finished(
    client: openai.OpenAI,
) -> None:
    text = "One sentence first. Then a second one. And a third to finish."
    started = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    with client.audio.speech.with_streaming_response.create(
        model="kokoro-onnx", voice="jm_kumo", input=text, response_format="pcm",
        extra_body={"stream": True},
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for piece in response.iter_bytes():
            arrivals.append((time.monotonic() - started, len(piece)))
    assert len(arrivals) > 1, arrivals
    assert arrivals[0][0] < 0.7 * arrivals[-1][0], arrivals
    seconds = sum(n for _, n in arrivals) / 2 / 24000
    assert 2.0 < seconds < 10.0


def test_an_unknown_voice_is_a_400_listing_the_voices(server: Server,
                                                      client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="kokoro-onnx", voice="af_heart", input="Hello.")
    message = str(caught.value)
    assert "af_heart" in message and "jf_alpha" in message and "jm_kumo" in message
    listing = server.get("/v1/audio/voices?model=kokoro-onnx")
    assert listing.status == 200, listing.body
    voices = listing.json()
    assert voices["default"] == "jf_alpha" and {"jf_alpha", "jm_kumo"} <= set(voices["voices"])
