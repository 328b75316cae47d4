"""The ``synthetic`` worker kind: a real text-to-speech model that needs no weights.

It exists so the whole lifecycle (spawn, load, stream, cancel, crash, evict, unload) can be
tried, demonstrated and tested on any machine, without torch or a download. Its cost is
tunable through recipe options: how long loading takes, how much memory the process really
holds afterwards, how long each answer takes, how it is streamed, and how it fails. The audio
it returns is a genuine sine tone in 16-bit mono PCM, optionally wrapped in a WAV header, with
a duration that follows the length of the input text, so clients can play what they get.

Recipe options (all optional)::

    type          "tts" (the only type served so far; default: the recipe's type)
    load_seconds  seconds spent loading, with progress reports (default 0)
    memory_mb     MiB allocated and touched at load, held for the life of the process (0)
    latency_ms    time per call, spread across its chunks; cancellable (0)
    chunks        pieces a streamed answer is cut into, 1..1000 (4)
    fail_load     true or a message: the load fails after its delay (false)
    crash_on_call true: every call kills the process with SIGKILL (false)
    sample_rate   8000..48000 Hz (24000)
"""

from __future__ import annotations

import array
import math
import os
import signal
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from workers.base import (
    CallContext,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
    invalid,
)
from workers.protocol import WARMUP_OP, ErrorCode

VOICES: Mapping[str, float] = {"tone": 440.0, "low": 220.0, "high": 880.0}
FORMATS: tuple[str, ...] = ("wav", "pcm")
SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.2
MAX_SECONDS = 60.0
MIN_SPEED, MAX_SPEED = 0.25, 4.0
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
MAX_CHUNKS = 1000
_AMPLITUDE = 0.3 * 32767
_FADE_SECONDS = 0.01
_PROGRESS_EVERY_S = 0.1
_MIB = 1024 * 1024

_OPTIONS = (
    "type",
    "load_seconds",
    "memory_mb",
    "latency_ms",
    "chunks",
    "fail_load",
    "crash_on_call",
    "sample_rate",
)


def _bad(message: str) -> ModelError:
    return ModelError(ErrorCode.BAD_CONFIG, message)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _number_option(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if not _is_number(value) or value < 0:
        raise _bad(f"synthetic option {key!r} must be a number >= 0, got {value!r:.60}")
    return float(value)


def _int_option(options: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = options.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise _bad(
            f"synthetic option {key!r} must be an integer in {low}..{high}, got {value!r:.60}"
        )
    return value


@dataclass(frozen=True)
class SyntheticConfig:
    """The validated recipe options."""

    load_seconds: float = 0.0
    memory_mb: float = 0.0
    latency_ms: float = 0.0
    chunks: int = 4
    fail_load: str | None = None
    crash_on_call: bool = False
    sample_rate: int = 24000

    @classmethod
    def from_options(cls, options: Mapping[str, Any], default_type: str) -> SyntheticConfig:
        unknown = sorted(str(k) for k in options if k not in _OPTIONS)
        if unknown:
            raise _bad(
                f"unknown synthetic option(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(_OPTIONS)}"
            )
        model_type = options.get("type", default_type)
        if not isinstance(model_type, str):
            raise _bad(f"synthetic option 'type' must be a string, got {model_type!r:.60}")
        if model_type != "tts":
            raise _bad(f"synthetic kind serves only 'tts' so far, not {model_type!r:.60}")
        fail_load = options.get("fail_load", False)
        if fail_load is True:
            failure: str | None = "synthetic load failure (fail_load option)"
        elif fail_load is False:
            failure = None
        elif isinstance(fail_load, str) and fail_load:
            failure = fail_load
        else:
            raise _bad(
                "synthetic option 'fail_load' must be true, false or a non-empty message, "
                f"got {fail_load!r:.60}"
            )
        crash = options.get("crash_on_call", False)
        if not isinstance(crash, bool):
            raise _bad(f"synthetic option 'crash_on_call' must be true or false, got {crash!r:.60}")
        return cls(
            load_seconds=_number_option(options, "load_seconds", 0.0),
            memory_mb=_number_option(options, "memory_mb", 0.0),
            latency_ms=_number_option(options, "latency_ms", 0.0),
            chunks=_int_option(options, "chunks", 4, 1, MAX_CHUNKS),
            fail_load=failure,
            crash_on_call=crash,
            sample_rate=_int_option(
                options, "sample_rate", 24000, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE
            ),
        )


# --------------------------------------------------------------------------- audio


def tone_pcm(frequency: float, sample_rate: int, samples: int) -> bytes:
    """A sine tone as 16-bit signed little-endian mono PCM, with short fades at both ends."""
    # The wave repeats exactly every sample_rate / gcd(sample_rate, f) samples (at most one
    # second), so one period is computed and tiled rather than calling sin() per sample.
    freq = round(frequency)
    period = sample_rate // math.gcd(sample_rate, freq)
    step = 2.0 * math.pi * freq / sample_rate
    one = array.array("h", (round(_AMPLITUDE * math.sin(step * i)) for i in range(period)))
    pcm = one * (samples // period + 1)
    del pcm[samples:]
    fade = min(int(_FADE_SECONDS * sample_rate), samples // 2)
    for i in range(fade):
        gain = i / fade
        pcm[i] = round(pcm[i] * gain)
        pcm[samples - 1 - i] = round(pcm[samples - 1 - i] * gain)
    if sys.byteorder == "big":
        pcm.byteswap()
    return pcm.tobytes()


def wav_header(sample_rate: int, data_bytes: int) -> bytes:
    """The 44-byte RIFF/WAVE header for 16-bit mono PCM of a known length."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # PCM
        1,  # mono
        sample_rate,
        sample_rate * 2,  # byte rate
        2,  # block align
        16,  # bits per sample
        b"data",
        data_bytes,
    )


def speech_samples(text: str, speed: float, sample_rate: int) -> int:
    seconds = min(MAX_SECONDS, max(MIN_SECONDS, SECONDS_PER_CHAR * len(text) / speed))
    return round(seconds * sample_rate)


# --------------------------------------------------------------------------- model


class SyntheticModel(Model):
    """A torch-free TTS model whose load time, memory, latency and faults are recipe options."""

    kind: ClassVar[str] = "synthetic"

    def __init__(self) -> None:
        self.config = SyntheticConfig()
        self._ballast: bytearray | None = None

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        config = SyntheticConfig.from_options(request.options, request.type)
        self.config = config
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < config.load_seconds:
            ctx.progress(min(1.0, elapsed / config.load_seconds), "loading synthetic model")
            time.sleep(min(_PROGRESS_EVERY_S, config.load_seconds - elapsed))
        if config.memory_mb > 0:
            ctx.progress(None, f"allocating {config.memory_mb:g} MiB")
            # Repeating one byte fills every page, so the RSS grows now (a zeroed buffer
            # would only reserve address space).
            self._ballast = bytearray(b"\x5a") * int(config.memory_mb * _MIB)
        if config.fail_load is not None:
            raise ModelError(ErrorCode.LOAD_FAILED, config.fail_load)
        ctx.progress(1.0, "ready")
        return LoadResult(
            device="cpu",
            info={
                "memory_mb": config.memory_mb,
                "type": "tts",
                "sample_rate": config.sample_rate,
            },
        )

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == WARMUP_OP:
            # Exercise the synthesis path once so the first real request pays no first-use cost.
            tone_pcm(440.0, self.config.sample_rate, speech_samples("warmup", 1.0, 8000))
            return {"warmed_up": True}
        if op != "speech":
            raise ModelError(ErrorCode.UNSUPPORTED, "synthetic tts model supports op 'speech' only")
        config = self.config
        if config.crash_on_call:
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash, as the recipe asked
        text, frequency, fmt, speed = _speech_args(args)
        rate = config.sample_rate
        samples = speech_samples(text, speed, rate)
        pcm = tone_pcm(frequency, rate, samples)
        pieces = _split(pcm, config.chunks)
        if fmt == "wav":
            pieces[0] = wav_header(rate, len(pcm)) + pieces[0]
        pause = config.latency_ms / 1000.0 / len(pieces)
        for piece in pieces:
            if pause > 0:
                ctx.sleep(pause)
            ctx.emit(piece)
        return {"sample_rate": rate, "samples": samples, "format": fmt}


def _speech_args(args: Mapping[str, Any]) -> tuple[str, float, str, float]:
    """Validate the ``speech`` arguments; unknown arguments are ignored, as OpenAI's are."""
    text = args.get("input")
    if not isinstance(text, str) or not text:
        raise invalid("'input' must be a non-empty string")
    voice = args.get("voice", "tone")
    if not isinstance(voice, str):
        raise invalid("'voice' must be a string")
    if voice not in VOICES:
        raise invalid(f"unknown voice {voice!r:.60}; allowed voices: {', '.join(VOICES)}")
    fmt = args.get("response_format", "wav")
    if not isinstance(fmt, str):
        raise invalid("'response_format' must be a string")
    if fmt not in FORMATS:
        raise ModelError(
            ErrorCode.UNSUPPORTED,
            f"response_format {fmt!r:.40} is not supported; allowed: {', '.join(FORMATS)}",
        )
    speed = args.get("speed", 1.0)
    if not _is_number(speed) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise invalid(f"'speed' must be a number in {MIN_SPEED}..{MAX_SPEED}, got {speed!r:.40}")
    return text, VOICES[voice], fmt, float(speed)


def _split(pcm: bytes, count: int) -> list[bytes]:
    """Cut PCM into ``count`` pieces of whole samples, as even as possible."""
    samples = len(pcm) // 2
    count = max(1, min(count, samples))
    bounds = [2 * (samples * i // count) for i in range(count + 1)]
    return [pcm[bounds[i] : bounds[i + 1]] for i in range(count)]
