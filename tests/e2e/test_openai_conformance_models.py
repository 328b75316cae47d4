"""OpenAI's response schemas on the routes served by real models: chat, chat chunks,
completions, completion chunks, embeddings (float and base64), transcriptions in every format.

One server (module scope) with SmolLM2-135M, all-MiniLM-L6-v2 and whisper tiny.en, loaded
in the fixture, before the per-test leak guard looks. Each answer is checked against the
required fields and types of OpenAI's schema (tests/e2e/openai_shapes.py), with the
required-but-nullable fields checked for presence, and every stream byte by byte. Answers
are a few tokens long: this runs on CPUs.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.audio import TranscriptionVerbose
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.e2e import openai_shapes as shapes
from tests.e2e.conftest import Server, module_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = """
[server]
auto_unload_timer = "never"
[models.smol]
recipe = "llm"
type = "llm"
max_concurrency = 1
[models.minilm]
recipe = "embedding"
type = "embedding"
[models.whisper]
recipe = "asr"
device = "cpu"
[models.whisper.options]
threads = 2
beam_size = 1
"""
TIMEOUT_S = 600.0
MESSAGES = [{"role": "user", "content": "Name a colour."}]
SPEECH = Path(__file__).resolve().parent.parent / "data" / "quick_brown_fox.flac"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, CONFIG, "shapes", load=("smol", "minilm", "whisper"),
                             load_timeout_s=TIMEOUT_S, shared_data=True)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=TIMEOUT_S) as c:
        yield c


def post(server: Server, path: str, body: dict[str, Any]) -> Any:
    result = server.post(path, body, timeout=TIMEOUT_S)
    assert result.status == 200, result.body[:500]
    return result


def no_null_fingerprint(obj: dict[str, Any]) -> None:
    assert obj.get("system_fingerprint", "absent") is not None, obj


# ===================================================================== chat


def test_whole_chat_matches_the_schema(server: Server, client: openai.OpenAI) -> None:
    body = post(server, "/v1/chat/completions",
                {"model": "smol", "messages": MESSAGES, "max_tokens": 4}).json()
    shapes.check(shapes.CHAT_COMPLETION, body)
    choice = body["choices"][0]
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    assert "logprobs" in choice and choice["logprobs"] is None
    no_null_fingerprint(body)
    ChatCompletion.model_validate(body)
    answer = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=2)
    assert answer.choices[0].message.refusal is None and answer.object == "chat.completion"


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_chunks_match_the_schema(server: Server, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": "smol", "messages": MESSAGES, "max_tokens": 4,
                            "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    result = post(server, "/v1/chat/completions", body)
    assert result.headers["Content-Type"].startswith("text/event-stream")
    chunks = shapes.sse_json(result.body, done=True)
    for chunk in chunks:
        shapes.check(shapes.CHAT_CHUNK, chunk)
        no_null_fingerprint(chunk)
        ChatCompletionChunk.model_validate(chunk)
    if include_usage:
        *answer, last = chunks
        assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
        # The chat chunk schema has usage nullable: null on every chunk but the last.
        assert all("usage" in c and c["usage"] is None for c in answer)
    else:
        answer = chunks
        assert not any("usage" in c for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in answer]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    assert all("finish_reason" in c["choices"][0] for c in answer)


# ===================================================================== completions


def test_whole_completion_matches_the_schema(server: Server) -> None:
    body = post(server, "/v1/completions",
                {"model": "smol", "prompt": "The sky is", "max_tokens": 3}).json()
    shapes.check(shapes.TEXT_COMPLETION, body)
    assert "logprobs" in body["choices"][0]
    no_null_fingerprint(body)
    Completion.model_validate(body)


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_chunks_never_carry_a_null_usage(server: Server,
                                                    include_usage: bool) -> None:
    body: dict[str, Any] = {"model": "smol", "prompt": "The sky is", "max_tokens": 3,
                            "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = shapes.sse_json(post(server, "/v1/completions", body).body, done=True)
    for chunk in chunks:
        shapes.check(shapes.TEXT_COMPLETION_CHUNK, chunk)
        no_null_fingerprint(chunk)
    answer = chunks
    if include_usage:
        *answer, last = chunks
        assert last["choices"] == [] and last["usage"]["completion_tokens"] <= 3
    assert not any("usage" in c for c in answer)
    finishes = [c["choices"][0]["finish_reason"] for c in answer]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) <= {None}


# ===================================================================== embeddings


def test_embeddings_match_the_schema_as_floats_and_base64(server: Server) -> None:
    floats = post(server, "/v1/embeddings", {"model": "minilm", "input": ["a", "b"]}).json()
    shapes.check(shapes.embeddings("float"), floats)
    CreateEmbeddingResponse.model_validate(floats)
    packed = post(server, "/v1/embeddings", {"model": "minilm", "input": ["a", "b"],
                                             "encoding_format": "base64"}).json()
    shapes.check(shapes.embeddings("base64"), packed)
    for row, vector in zip(packed["data"], floats["data"], strict=True):
        assert len(base64.b64decode(row["embedding"], validate=True)) == \
            4 * len(vector["embedding"])


# ===================================================================== transcriptions


def transcribe(server: Server, **fields: str) -> Any:
    boundary = "conformance"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
             .encode() for k, v in {"model": "whisper", **fields}.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"fox.flac\"\r\nContent-Type: audio/flac\r\n\r\n".encode()
                 + SPEECH.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    result = server.post("/v1/audio/transcriptions", data=body, timeout=TIMEOUT_S,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert result.status == 200, result.body[:500]
    return result


def test_transcriptions_match_the_schema_in_every_format(server: Server) -> None:
    plain = transcribe(server).json()
    shapes.check(shapes.TRANSCRIPTION, plain)
    assert "fox" in plain["text"].lower()
    verbose = transcribe(server, response_format="verbose_json").json()
    shapes.check(shapes.TRANSCRIPTION_VERBOSE, verbose)
    assert verbose["segments"] and "words" not in verbose
    TranscriptionVerbose.model_validate(verbose)
    words = transcribe(server, response_format="verbose_json",
                       **{"timestamp_granularities[]": "word"}).json()
    shapes.check(shapes.TRANSCRIPTION_VERBOSE, words)
    assert words["words"] and "words" in shapes.TRANSCRIPTION_VERBOSE["properties"]
    text = transcribe(server, response_format="text")
    assert text.headers["Content-Type"].startswith("text/plain")
    assert "fox" in text.body.decode().lower()
    srt = transcribe(server, response_format="srt").body.decode()
    assert srt.startswith("1\n00:00:") and " --> " in srt
    vtt = transcribe(server, response_format="vtt")
    assert vtt.headers["Content-Type"].startswith("text/vtt")
    assert vtt.body.decode().startswith("WEBVTT\n")
