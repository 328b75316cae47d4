"""OpenAI conformance on the fast kinds, through a real server and the official ``openai`` SDK.

Models (``GET /v1/models/{id}``, ``client.models.retrieve``), OpenAI's error shape with
``error.param`` on every error, and speech as OpenAI's schema has it: ``mp3`` by default where
the kind encodes it, a format the model's kind cannot produce (``aac`` on any) refused before
anything loads, ``stream_format: "sse"`` framed byte by byte, and OpenAI's voice names on the
synthetic kind (tones of known pitch, so the mapping is heard, not assumed) and on hibari,
with a recipe's own ``voice_aliases`` over the default table, and a bad one stopping the
start. The chat, completion, embedding and transcription shapes are in
test_openai_conformance_models.py (real models, slow).
"""

from __future__ import annotations

import array
import base64
import io
import itertools
import wave
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e import openai_shapes as shapes
from tests.e2e.conftest import Server, dedent_config, launch_server, run_cli

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
[models.tone-custom]
recipe = "synthetic"
type = "tts"
[models.tone-custom.options]
voice_aliases = { alloy = "high", narrator = "low" }
[models.tone-paced]
recipe = "synthetic"
type = "tts"
[models.tone-paced.options]
latency_ms = 400
[models.tone-cold]
recipe = "synthetic"
type = "tts"
[models.tone-dies]
recipe = "synthetic"
type = "tts"
[models.tone-dies.options]
fault = "sigkill_mid_call"
fault_after_chunks = 1
[models.hib]
recipe = "hibari"
[models.hib.options]
seed = 7
[models.hib-cold]
recipe = "hibari"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch_server(CONFIG, Path(tmp_path_factory.mktemp("conformance")))
    try:
        # Loaded here, before the per-test leak guard looks; the *-cold ones never load.
        for name in ("tone", "tone-custom", "tone-paced", "hib"):
            server.load(name)
        yield server
        assert server.alive(), server.log_text()
        assert not any("this is a bug" in line for line in server.log_lines), server.log_text()
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=60) as c:
        yield c


def pitch(wav_bytes: bytes) -> float:
    """The frequency of a synthetic tone in Hz, from its zero crossings."""
    with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
    samples = array.array("h", frames)
    crossings = sum(1 for a, b in itertools.pairwise(samples) if (a < 0) != (b < 0))
    return crossings / 2 / (len(samples) / rate)


def assert_unloaded(server: Server, name: str) -> None:
    row = server.model(name)
    assert (row["state"], row["pid"]) == ("unloaded", None), row


# ===================================================================== models


def test_models_retrieve_with_the_sdk(server: Server, client: openai.OpenAI) -> None:
    model = client.models.retrieve("hib")
    assert (model.id, model.object, model.owned_by) == ("hib", "model", "lemonade")
    assert isinstance(model.created, int)
    raw = server.get("/v1/models/tone-custom")
    assert raw.status == 200 and raw.headers["Content-Type"].startswith("application/json")
    shapes.check(shapes.MODEL, raw.json())
    assert raw.json()["id"] == "tone-custom" and raw.json()["type"] == "tts"
    listed = shapes.check(shapes.MODEL_LIST, server.get("/v1/models").json())
    assert {m["id"] for m in listed["data"]} >= {"tone", "hib"}
    assert next(m for m in listed["data"] if m["id"] == "hib") == server.get(
        "/v1/models/hib").json()
    assert_unloaded(server, "hib-cold")  # asking about a model never loads it


def test_an_unknown_model_is_a_404_in_openai_shape(server: Server,
                                                    client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    raw = server.get("/v1/models/no-such-model")
    assert raw.status == 404
    error = shapes.check(shapes.ERROR, raw.json())["error"]
    assert "no-such-model" in error["message"] and error["param"] is None


# ===================================================================== errors

_SPEECH = {"model": "tone-cold", "input": "hello"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/audio/speech", {**_SPEECH, "speed": 9}, 400, "speed"),
    ("/v1/audio/speech", {"model": "tone-cold"}, 400, "input"),
    ("/v1/audio/speech", {**_SPEECH, "input": 5}, 400, "input"),
    ("/v1/audio/speech", {**_SPEECH, "response_format": "aac"}, 400, "response_format"),
    ("/v1/audio/speech", {**_SPEECH, "response_format": "mp3"}, 400, "response_format"),
    ("/v1/audio/speech", {**_SPEECH, "stream_format": "chunks"}, 400, "stream_format"),
    ("/v1/audio/speech", {**_SPEECH, "keep_alive": "soon"}, 400, "keep_alive"),
    ("/v1/audio/speech", {**_SPEECH, "model": "no-such-model"}, 404, None),
    ("/v1/chat/completions", {"model": "tone-cold", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tone-cold", "temperature": 7,
                              "messages": [{"role": "user", "content": "hi"}]},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "tone-cold",
                              "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/embeddings", {"model": "tone-cold", "input": []}, 400, "input"),
    ("/v1/no/such/route", {}, 404, None),
], ids=["speed", "input-missing", "input-type", "aac", "mp3-on-synthetic", "stream_format",
        "keep_alive", "unknown-model", "messages-empty", "temperature", "wrong-model-type",
        "embeddings-input", "unknown-route"])
def test_every_error_has_openai_shape_and_param(server: Server, path: str, body: dict,
                                                status: int, param: str | None) -> None:
    result = server.post(path, body)
    assert result.status == status, result.body[:300]
    error = shapes.check(shapes.ERROR, result.json())["error"]
    assert "param" in error and error["param"] == param, error
    assert_unloaded(server, "tone-cold")


def test_a_405_and_a_multipart_error_have_param_too(server: Server) -> None:
    wrong_method = server.get("/v1/audio/speech")
    assert wrong_method.status == 405 and wrong_method.headers["Allow"]
    assert shapes.check(shapes.ERROR, wrong_method.json())["error"]["param"] is None
    boundary = "xyzzy"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            f"tone-cold\r\n--{boundary}--\r\n").encode()
    no_file = server.post("/v1/audio/transcriptions", data=form,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert no_file.status == 400, no_file.body[:300]
    assert shapes.check(shapes.ERROR, no_file.json())["error"]["param"] == "file"


def test_the_sdk_sees_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="tone-cold", voice="tone", input="hi", speed=9)
    assert caught.value.param == "speed"
    assert caught.value.type == "invalid_request_error"


# ===================================================================== formats


@pytest.mark.parametrize(("model", "fmt"), [("hib-cold", "aac"), ("tone-cold", "aac"),
                                            ("tone-cold", "mp3"), ("tone-cold", "flac"),
                                            ("tone-cold", "opus")])
def test_a_format_the_kind_cannot_produce_is_refused_before_loading(
        server: Server, model: str, fmt: str) -> None:
    spawns = server.status()["server"]["spawns"]
    result = server.speech(model, response_format=fmt)
    assert result.status == 400, result.body[:300]
    error = result.error
    assert error["param"] == "response_format" and fmt in error["message"]
    assert_unloaded(server, model)
    assert server.status()["server"]["spawns"] == spawns


def test_default_format_is_mp3_where_the_kind_encodes_it(server: Server,
                                                          client: openai.OpenAI) -> None:
    # The SDK sends no response_format unless asked: the server's default applies.
    with client.audio.speech.with_streaming_response.create(
            model="hib", voice="heart", input="Hello there.") as response:
        assert response.headers["content-type"] == "audio/mpeg"
        audio = response.read()
    assert audio[:3] == b"ID3" or (audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0), audio[:8]
    # The synthetic kind writes wav and pcm only: its default is wav.
    tone = server.speech("tone")
    assert tone.status == 200 and tone.headers["Content-Type"] == "audio/wav"
    assert tone.body[:4] == b"RIFF"


# ===================================================================== voices


def test_openai_voices_map_onto_the_synthetic_tones(client: openai.OpenAI) -> None:
    def hear(model: str, voice: str) -> float:
        return pitch(client.audio.speech.create(model=model, voice=voice, input="Hello there",
                                                response_format="wav").content)

    assert abs(hear("tone", "tone") - 440) < 15
    assert abs(hear("tone", "alloy") - 440) < 15  # default table: alloy -> tone
    assert abs(hear("tone", "onyx") - 220) < 15   # a deep voice -> low
    assert abs(hear("tone", "nova") - 880) < 30   # a bright voice -> high
    # The recipe's own table wins (alloy -> high) and adds names (narrator -> low); the
    # default entries it does not change stay (onyx -> low).
    assert abs(hear("tone-custom", "alloy") - 880) < 30
    assert abs(hear("tone-custom", "narrator") - 220) < 15
    assert abs(hear("tone-custom", "onyx") - 220) < 15


def test_alloy_on_hibari_is_the_bundled_heart(server: Server, client: openai.OpenAI) -> None:
    def speak(voice: str) -> bytes:
        return client.audio.speech.create(model="hib", voice=voice, input="Good morning.",
                                          response_format="wav").content

    heart = speak("heart")
    assert len(heart) > 10_000
    # hibari ships only heart; a voice that is not on disk is never the target of an alias.
    # seed = 7 fixes the noise, so the same voice gives the same bytes.
    for voice in ("alloy", "nova", "onyx"):
        assert speak(voice) == heart, voice
    unknown = server.speech("hib", voice="no-such-voice")
    assert unknown.status == 400 and "no-such-voice" in unknown.error["message"]


def test_the_voice_list_shows_the_aliases(server: Server) -> None:
    hib = server.get("/v1/audio/voices?model=hib-cold").json()
    assert "heart" in hib["voices"]
    assert set(hib["aliases"]) >= {"alloy", "ash", "coral", "echo", "fable", "nova", "onyx",
                                   "sage", "shimmer"}
    assert all(voice in hib["voices"] for voice in hib["aliases"].values())
    custom = server.get("/v1/audio/voices?model=tone-custom").json()
    assert custom["aliases"]["alloy"] == "high" and custom["aliases"]["narrator"] == "low"
    assert custom["aliases"]["nova"] == "high" and custom["loaded"] in (True, False)
    assert_unloaded(server, "hib-cold")


def test_a_bad_voice_alias_stops_the_start_naming_file_model_and_key(tmp_path: Path) -> None:
    path = tmp_path / "lemonade.toml"
    path.write_text(dedent_config("""
        [models.voice]
        recipe = "synthetic"
        type = "tts"
        [models.voice.options]
        voice_aliases = { alloy = "af_bella" }
    """))
    result = run_cli("serve", "--config", str(path), "--port", "0", timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"{path}: [models.voice] options: synthetic option 'voice_aliases'" in line, line
    assert "'af_bella'" in line and "tone" in line


# ===================================================================== sse


def test_sse_speech_is_openai_framed_and_carries_the_same_audio(server: Server) -> None:
    # Paced (400 ms over 4 pieces), so the worker's pieces are not joined into one frame.
    body = {"model": "tone-paced", "input": "Streaming speech", "response_format": "wav"}
    streamed = server.post("/v1/audio/speech", {**body, "stream": True})
    assert streamed.status == 200
    sse = server.post("/v1/audio/speech", {**body, "stream_format": "sse"})
    assert sse.status == 200, sse.body[:300]
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    events = shapes.sse_json(sse.body, done=False)
    *deltas, done = events
    assert len(deltas) > 1  # the synthetic kind sends its tone in pieces
    for event in deltas:
        shapes.check(shapes.SPEECH_DELTA, event)
        assert set(event) == {"type", "audio"}
    shapes.check(shapes.SPEECH_DONE, done)
    audio = b"".join(base64.b64decode(e["audio"], validate=True) for e in deltas)
    assert audio == streamed.body
    assert abs(pitch(audio) - 440) < 15
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_sse_speech_with_the_sdk_and_mp3(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="hib", voice="alloy", input="Hello.", stream_format="sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    *deltas, done = shapes.sse_json(raw, done=False)
    assert done["type"] == "speech.audio.done" and deltas
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert audio[:3] == b"ID3" or audio[0] == 0xFF  # mp3, the default


def test_a_broken_sse_speech_stream_ends_with_an_error_event(server: Server) -> None:
    result = server.post("/v1/audio/speech", {"model": "tone-dies", "input": "x" * 200,
                                              "stream_format": "sse"})
    assert result.status == 200
    events = shapes.sse_json(result.body, done=False)
    assert events[0]["type"] == "speech.audio.delta"
    last = events[-1]
    assert last["type"] == "error" and last != events[0]
    shapes.check(shapes.ERROR, {"error": last["error"]})
    assert last["error"]["param"] is None
    assert not any(e["type"] == "speech.audio.done" for e in events)


def test_stream_format_audio_is_the_plain_byte_stream(server: Server) -> None:
    plain = server.post("/v1/audio/speech", {"model": "tone", "input": "Same",
                                             "response_format": "pcm", "stream": True})
    audio = server.post("/v1/audio/speech", {"model": "tone", "input": "Same",
                                             "response_format": "pcm", "stream": True,
                                             "stream_format": "audio"})
    assert audio.status == 200 and audio.headers["Content-Type"] == "audio/pcm"
    assert audio.body == plain.body  # bytes, not events
    assert not audio.body.startswith(b"data: ")
