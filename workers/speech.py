"""The ``speech`` op as both Kokoro kinds serve it: argument checks and audio delivery.

``kokoro`` (torch) and ``kokoro-onnx`` differ only in how a sentence's phonemes become samples;
what a request may ask for and how the samples reach the supervisor is one contract, kept
here so the two cannot drift apart:

- ``input`` (non-empty, at most 4096 characters, OpenAI's limit), ``voice`` (a name or blend,
  parsed by the kind against its voices), ``response_format`` (:mod:`workers.speech_formats`),
  ``speed`` (0.25..4), ``stream`` (bool). Every check is repeated here although the route
  already made it: a worker must never trust its caller.
- A whole answer is one encoded file; a streamed one is encoded sentence by sentence with
  :class:`workers.audio.AudioStream`. Either way the bytes leave in pieces of at most 1 MiB,
  because 4096 characters at speed 0.25 is a quarter of an hour of audio, and one frame that
  size would break the protocol's frame limit and cost the worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers import speech_formats
from workers.audio import FORMATS, AudioStream, encode
from workers.base import CallContext, invalid
from workers.speech_formats import MAX_INPUT_CHARS, MAX_SPEED, MIN_SPEED

#: The format of a call that names none (OpenAI's default; these kinds all encode it).
DEFAULT_FORMAT = speech_formats.for_kind("kokoro").default
#: Largest piece sent to the supervisor at once (the route joins or relays the pieces).
MAX_EMIT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str | None
    format: str
    speed: float
    stream: bool


def parse_speech_args(args: Mapping[str, Any]) -> SpeechRequest:
    """Check a ``speech`` call's args; raise ``invalid_request`` naming the field."""
    text = args.get("input")
    if not isinstance(text, str) or not text.strip():
        raise invalid("input must be a non-empty string")
    if len(text) > MAX_INPUT_CHARS:
        raise invalid(f"input is {len(text)} characters long; the limit is {MAX_INPUT_CHARS}")
    voice = args.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise invalid("voice must be a string (a voice name or a blend like 'a(2)+b')")
    fmt = args.get("response_format", DEFAULT_FORMAT)
    if fmt not in FORMATS:
        raise invalid(f"response_format must be one of {', '.join(FORMATS)}; got {fmt!r:.40}")
    speed = args.get("speed", 1.0)
    if (isinstance(speed, bool) or not isinstance(speed, int | float)
            or not math.isfinite(speed) or not MIN_SPEED <= speed <= MAX_SPEED):
        raise invalid(f"speed must be a number between {MIN_SPEED:g} and {MAX_SPEED:g}")
    stream = args.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false")
    return SpeechRequest(text, voice, str(fmt), float(speed), stream)


def emit_bytes(ctx: CallContext, data: bytes) -> None:
    """Send ``data`` as chunks of at most :data:`MAX_EMIT_BYTES` (nothing for empty data)."""
    for start in range(0, len(data), MAX_EMIT_BYTES):
        ctx.emit(data[start:start + MAX_EMIT_BYTES])


def deliver(sentences: Iterable[Any], request: SpeechRequest, sample_rate: int,
            ctx: CallContext, *, emit: bool = True) -> dict[str, Any]:
    """Encode and emit the samples of each sentence as ``request`` asks; return the result.

    ``sentences`` yields float sample arrays, one per synthesised chunk, lazily: a streamed
    answer sends each one before the next is made. ``emit=False`` (warmup) synthesises and
    encodes without sending anything. A text with nothing to say is a 400.
    """
    encoder = AudioStream(request.format, sample_rate) if request.stream else None
    whole: list[Any] = []
    samples = 0
    chunks = 0
    for audio in sentences:
        chunks += 1
        samples += len(audio)
        if encoder is None:
            whole.append(audio)
            continue
        piece = encoder.write(audio)
        if emit:
            emit_bytes(ctx, piece)
    if chunks == 0:
        raise invalid("input has nothing to speak (no pronounceable words)")
    data = encoder.close() if encoder is not None else encode(
        np.concatenate(whole), sample_rate, request.format)
    if emit:
        emit_bytes(ctx, data)
    return {"sample_rate": sample_rate, "seconds": round(samples / sample_rate, 3),
            "chunks": chunks}
