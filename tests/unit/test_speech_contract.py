"""The speech op's shared contract (workers/speech.py): checks, delivery, frame sizes."""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from workers.base import CallContext, ModelError
from workers.protocol import MAX_WORKER_FRAME_BYTES
from workers.speech import MAX_EMIT_BYTES, deliver, emit_bytes, parse_speech_args

RATE = 24000


def collecting() -> tuple[CallContext, list[bytes]]:
    sent: list[bytes] = []
    return CallContext(sent.append, threading.Event()), sent


def sentences(count: int, seconds: float = 0.5) -> list[np.ndarray[Any, Any]]:
    t = np.arange(int(RATE * seconds)) / RATE
    return [(0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t)).astype(np.float32)
            for i in range(count)]


@pytest.mark.parametrize(("args", "words"), [
    ({}, "input must be a non-empty string"),
    ({"input": "   "}, "input must be a non-empty string"),
    ({"input": "x" * 4097}, "the limit is 4096"),
    ({"input": "hi", "voice": 3}, "voice must be a string"),
    ({"input": "hi", "response_format": "aac"}, "response_format must be one of"),
    ({"input": "hi", "speed": 0.1}, "speed must be a number between 0.25 and 4"),
    ({"input": "hi", "speed": True}, "speed must be a number"),
    ({"input": "hi", "speed": float("nan")}, "speed must be a number"),
    ({"input": "hi", "stream": "yes"}, "stream must be true or false"),
])
def test_bad_args_are_invalid_requests_naming_the_field(args, words) -> None:
    with pytest.raises(ModelError) as err:
        parse_speech_args(args)
    assert err.value.code == "invalid_request" and words in err.value.message


def test_defaults() -> None:
    # mp3, OpenAI's default, which every kind using this contract encodes.
    request = parse_speech_args({"input": "Hello."})
    assert (request.voice, request.format, request.speed, request.stream) == (
        None, "mp3", 1.0, False)


def test_long_audio_leaves_in_pieces_below_the_frame_limit() -> None:
    ctx, sent = collecting()
    audio = bytes(range(256)) * (MAX_EMIT_BYTES // 64)  # 4 MiB
    emit_bytes(ctx, audio)
    assert len(sent) == 4 and all(len(p) <= MAX_EMIT_BYTES for p in sent)
    assert b"".join(sent) == audio
    assert MAX_EMIT_BYTES * 4 < MAX_WORKER_FRAME_BYTES


def test_streamed_delivery_sends_each_sentence_before_the_next_is_made() -> None:
    ctx, sent = collecting()
    seen_before_each: list[int] = []

    def lazily() -> Any:
        for audio in sentences(3):
            seen_before_each.append(len(sent))
            yield audio

    request = parse_speech_args({"input": "x", "stream": True, "response_format": "wav"})
    result = deliver(lazily(), request, RATE, ctx)
    assert seen_before_each == [0, 1, 2]
    assert result == {"sample_rate": RATE, "seconds": 1.5, "chunks": 3}


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_whole_delivery_is_one_decodable_file(fmt: str) -> None:
    ctx, sent = collecting()
    deliver(iter(sentences(2)), parse_speech_args({"input": "x", "response_format": fmt}),
            RATE, ctx)
    samples, rate = sf.read(io.BytesIO(b"".join(sent)))
    assert rate == RATE and abs(len(samples) - RATE) < RATE // 10


def test_warmup_delivery_sends_nothing_and_silence_is_a_400() -> None:
    ctx, sent = collecting()
    deliver(iter(sentences(1)), parse_speech_args({"input": "x"}), RATE, ctx, emit=False)
    assert sent == []
    with pytest.raises(ModelError) as err:
        deliver(iter([]), parse_speech_args({"input": "x"}), RATE, ctx)
    assert err.value.code == "invalid_request" and "nothing to speak" in err.value.message
