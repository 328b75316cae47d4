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
    progress      false: load silently, with no progress reports at all (true)
    memory_mb     MiB allocated and touched at load, held for the life of the process (0)
    latency_ms    time per call, spread across its chunks; cancellable (0)
    chunks        pieces a streamed answer is cut into, 1..1000 (4)
    fail_load     true or a message: the load fails after its delay (false)
    crash_on_call true: every call kills the process with SIGKILL (false)
    sample_rate   8000..48000 Hz (24000)
    fault         one fault to inject, from the list below ("none")
    fault_after_chunks  chunks a call sends before a ``*_mid_call`` fault fires, 0..1000 (1)
    fault_delay_ms      the delay of ``late_reply`` and ``hang_after_load`` (1000 / 200)
    flood_chunks        chunks ``flood`` sends, 1..1000000 (10000)
    flood_chunk_bytes   bytes in each of them, 1..1048576 (2)
    lazy_import   a module of :mod:`workers.synthetic_imports` ("plain" or "starts_thread")
                  that the load imports, as real libraries import their code lazily during a
                  load; the load info says whether it was imported already
                  (``lazy_import_preloaded``: true in a worker forked from a zygote that learned it)
    load_output   what the load writes to stderr, as libraries inside real workers do ("none"):
                  "tqdm_bar" draws a tqdm-style byte bar (``\r``-rewritten, 50 updates over
                  ``load_seconds``, "synthetic weights:  42%|####2     | 84.0M/200M [...]");
                  "warnings" calls ``warnings.warn`` twice from one place, logs one WARNING
                  through a library-style logger and prints one raw line
    stand_in_vram_mb  a STAND-IN for a GPU model (0): placed on ``cuda:N``, the worker
                  reports this many MiB as its VRAM there; it allocates no GPU memory, so
                  per-device planning runs end to end on a machine without a GPU

Faults (the ``fault`` option). They are real: signals are really delivered, memory really
runs out, bytes really go over the socket. Nothing in the supervisor knows about them.

Load faults:

    crash_on_load       print a line to stderr, then exit with code 17 before answering
    oom_on_load         a real MemoryError: lower RLIMIT_AS, allocate past it (-> out_of_memory)
    hang_on_load        SIGSTOP itself during the load: no progress, no answer, no pings
    hang_after_load     load, then SIGSTOP itself ``fault_delay_ms`` later (heartbeats stop)
    fork_grandchild     start ``sleep 60`` holding the worker's stdout and stderr; its pid is
                        in the load info as ``grandchild_pid``
    ignore_sigterm      on ``shutdown``: ignore SIGTERM and hang, so only SIGKILL ends it

Call faults (each fires after ``fault_after_chunks`` chunks of a ``speech`` call):

    segfault_mid_call   a real segmentation fault (read address 0)
    sigkill_mid_call    SIGKILL itself (the OOM killer's signature)
    hang_mid_call       SIGSTOP itself: no more frames, no pongs, SIGTERM stays pending
    garbage_mid_call    write a frame whose body is the reserved msgpack byte 0xc1
    oversize_mid_call   write a length prefix of 0xFFFFFFF0 (and nothing more)
    bomb_mid_call       write an array32 of 500,000 empty maps (an element-count bomb)
    truncated_mid_call  write a header promising 1000 bytes, 10 of them, then exit
    wrong_id_mid_call   write a well-formed chunk for a request id nobody sent
    oom_mid_call        a real MemoryError, as ``oom_on_load`` (-> out_of_memory)
    late_reply          ignore cancel: sleep ``fault_delay_ms``, then answer in full anyway
    flood               send ``flood_chunks`` tiny chunks as fast as the socket takes them
"""

from __future__ import annotations

import array
import ctypes
import functools
import importlib
import logging
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from workers import recipe_options, speech_formats, synthetic_imports
from workers.base import (
    CallContext,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
    invalid,
)
from workers.option_values import bad_config as _bad
from workers.option_values import int_option, number_option
from workers.option_values import is_number as _is_number
from workers.protocol import WARMUP_OP, Chunk, ErrorCode, encode
from workers.runtime import flush_from_thread, send_raw_from_thread
from workers.voice_catalog import SYNTHETIC_VOICES

VOICES: Mapping[str, float] = SYNTHETIC_VOICES
FORMATS: tuple[str, ...] = speech_formats.for_kind("synthetic").formats
SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.2
MAX_SECONDS = 60.0
MIN_SPEED, MAX_SPEED = speech_formats.MIN_SPEED, speech_formats.MAX_SPEED
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
MAX_CHUNKS = 1000
_AMPLITUDE = 0.3 * 32767
_FADE_SECONDS = 0.01
_PROGRESS_EVERY_S = 0.1
_MIB = 1024 * 1024

#: Declared in workers/recipe_options.py: the supervisor checks recipes with the same spec.
_OPTIONS = recipe_options.SYNTHETIC
LOAD_FAULTS = recipe_options.SYNTHETIC_LOAD_FAULTS
CALL_FAULTS = recipe_options.SYNTHETIC_CALL_FAULTS
FAULTS = ("none", *LOAD_FAULTS, *CALL_FAULTS)
CRASH_ON_LOAD_EXIT = 17
#: An id no supervisor hands out this early (they count up from 1).
_FORGED_ID = 2**62 + 7


_number_option = functools.partial(number_option, "synthetic")
_int_option = functools.partial(int_option, "synthetic")


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
    progress: bool = True
    fault: str = "none"
    fault_after_chunks: int = 1
    fault_delay_ms: float | None = None
    flood_chunks: int = 10_000
    flood_chunk_bytes: int = 2
    lazy_import: str | None = None
    load_output: str = "none"
    stand_in_vram_mb: float = 0.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], default_type: str) -> SyntheticConfig:
        _OPTIONS.check(options)
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
        progress = options.get("progress", True)
        if not isinstance(progress, bool):
            raise _bad(f"synthetic option 'progress' must be true or false, got {progress!r:.60}")
        fault = options.get("fault", "none")
        if fault not in FAULTS:
            raise _bad(f"synthetic option 'fault' must be one of {', '.join(FAULTS)}; "
                       f"got {fault!r:.60}")
        delay = (_number_option(options, "fault_delay_ms", 0.0)
                 if "fault_delay_ms" in options else None)
        lazy_import = options.get("lazy_import")
        if lazy_import is not None and lazy_import not in synthetic_imports.NAMES:
            raise _bad(f"synthetic option 'lazy_import' must be one of "
                       f"{', '.join(synthetic_imports.NAMES)}; got {lazy_import!r:.60}")
        return cls(
            lazy_import=lazy_import,
            load_output=options.get("load_output", "none"),
            progress=progress,
            fault=fault,
            fault_after_chunks=_int_option(options, "fault_after_chunks", 1, 0, MAX_CHUNKS),
            fault_delay_ms=delay,
            flood_chunks=_int_option(options, "flood_chunks", 10_000, 1, 1_000_000),
            flood_chunk_bytes=_int_option(options, "flood_chunk_bytes", 2, 1, _MIB),
            load_seconds=_number_option(options, "load_seconds", 0.0),
            memory_mb=_number_option(options, "memory_mb", 0.0),
            stand_in_vram_mb=_number_option(options, "stand_in_vram_mb", 0.0),
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
        self._stand_in_vram = 0

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        config = SyntheticConfig.from_options(request.options, request.type)
        self.config = config
        started = time.monotonic()
        if config.load_output == "warnings":
            _library_warnings()
        elif config.load_output == "tqdm_bar":
            _draw_bar(config.load_seconds)
        while (elapsed := time.monotonic() - started) < config.load_seconds:
            if config.progress:
                ctx.progress(min(1.0, elapsed / config.load_seconds), "loading synthetic model")
            time.sleep(min(_PROGRESS_EVERY_S, config.load_seconds - elapsed))
        info: dict[str, Any] = {}
        if config.lazy_import is not None:
            module = f"{synthetic_imports.__name__}.{config.lazy_import}"
            info["lazy_import_preloaded"] = module in sys.modules
            importlib.import_module(module)
        if config.fault in LOAD_FAULTS:
            info.update(self._load_fault(config))
        if config.memory_mb > 0:
            size = int(config.memory_mb * _MIB)
            phase = f"allocating {config.memory_mb:g} MiB"
            ctx.progress(None, phase, done_bytes=0, total_bytes=size)
            # Repeating one byte fills every page, so the RSS grows now (a zeroed buffer
            # would only reserve address space).
            self._ballast = bytearray(b"\x5a") * size
            ctx.progress(None, phase, done_bytes=size, total_bytes=size)
        if config.fail_load is not None:
            raise ModelError(ErrorCode.LOAD_FAILED, config.fail_load)
        if config.progress:
            ctx.progress(1.0, "ready")
        device = "cpu"
        if config.stand_in_vram_mb > 0 and request.device.startswith(("cuda", "npu")):
            # A stand-in for a GPU model on a machine without one: the figure is reported as
            # VRAM on the device the supervisor placed it on; nothing is allocated there.
            device = request.device
            self._stand_in_vram = int(config.stand_in_vram_mb * _MIB)
            info["stand_in_vram"] = True
        return LoadResult(
            device=device,
            info={
                "memory_mb": config.memory_mb,
                "type": "tts",
                "sample_rate": config.sample_rate,
                **info,
            },
        )

    def vram_bytes(self) -> int:
        return self._stand_in_vram

    def _load_fault(self, config: SyntheticConfig) -> dict[str, Any]:
        fault = config.fault
        if fault == "crash_on_load":
            sys.stderr.write(f"synthetic fault: crash_on_load, exiting with code "
                             f"{CRASH_ON_LOAD_EXIT}\n")
            sys.stderr.flush()
            os._exit(CRASH_ON_LOAD_EXIT)
        if fault == "oom_on_load":
            real_memory_error()
        if fault == "hang_on_load":
            os.kill(os.getpid(), signal.SIGSTOP)
        if fault == "hang_after_load":
            delay = 0.2 if config.fault_delay_ms is None else config.fault_delay_ms / 1000
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGSTOP))
            timer.daemon = True
            timer.start()
        if fault == "fork_grandchild":
            # Same process group, stdout and stderr inherited: the supervisor's pipes stay
            # open for as long as it lives, unless the whole group is killed.
            child = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
            self._grandchild = child
            return {"grandchild_pid": child.pid}
        return {}

    def on_shutdown(self) -> None:
        """Called by the runtime (loop thread) on ``shutdown``; only faults do anything here."""
        if self.config.fault == "ignore_sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:  # a teardown stuck for good: only SIGKILL ends this
                time.sleep(3600)

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == WARMUP_OP:
            # Exercise the synthesis path once so the first real request pays no first-use cost;
            # a warmup is one call, so it takes a call's latency_ms too.
            tone_pcm(440.0, self.config.sample_rate, speech_samples("warmup", 1.0, 8000))
            ctx.sleep(self.config.latency_ms / 1000)
            return {"warmed_up": True}
        if op == "voices":
            return {"voices": sorted(VOICES), "default": "tone"}
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
        if config.fault == "late_reply":
            # Not cancellable on purpose: the answer arrives long after anyone wanted it.
            time.sleep(1.0 if config.fault_delay_ms is None else config.fault_delay_ms / 1000)
            emit = ctx._emit  # bypasses the cancel check
            for piece in pieces:
                emit(piece)
            return {"sample_rate": rate, "samples": samples, "format": fmt, "late": True}
        if config.fault == "flood":
            payload = b"\x00" * config.flood_chunk_bytes
            for _ in range(config.flood_chunks):
                ctx.emit(payload)
            return {"sample_rate": rate, "samples": config.flood_chunks, "format": "pcm"}
        mid_call = config.fault in CALL_FAULTS
        for i, piece in enumerate(pieces):
            if mid_call and i == config.fault_after_chunks:
                call_fault(config.fault)
            if pause > 0:
                ctx.sleep(pause)
            ctx.emit(piece)
        if mid_call and config.fault_after_chunks >= len(pieces):
            call_fault(config.fault)
        return {"sample_rate": rate, "samples": samples, "format": fmt}


_BAR_STEPS = 50
_BAR_TOTAL_MB = 200


def _draw_bar(seconds: float) -> None:
    """A tqdm-style byte bar on stderr, drawn over ``seconds`` as tqdm draws one."""
    started = time.monotonic()
    for step in range(_BAR_STEPS + 1):
        done = _BAR_TOTAL_MB * step / _BAR_STEPS
        filled = step * 10 // _BAR_STEPS
        elapsed = time.monotonic() - started
        sys.stderr.write(f"\rsynthetic weights: {step * 100 // _BAR_STEPS:3d}%|"
                         f"{'#' * filled}{' ' * (10 - filled)}| {done:.1f}M/{_BAR_TOTAL_MB}M "
                         f"[00:{int(elapsed):02d}<00:00, {done / max(elapsed, 0.01):.1f}MB/s]")
        sys.stderr.flush()
        if step < _BAR_STEPS:
            time.sleep(seconds / _BAR_STEPS)
    sys.stderr.write("\n")
    sys.stderr.flush()


def _library_warnings() -> None:
    """What a library's import and load typically print: a Python warning (raised twice from
    one place: Python shows it once), a logged warning, a raw print."""
    for _ in range(2):
        warnings.warn("synthetic library warning: this option is deprecated", UserWarning,
                      stacklevel=1)
    logging.getLogger("synthetic.library").warning("synthetic logged warning")
    print("synthetic raw print", flush=True)  # noqa: T201 - raw output is the point


def real_memory_error(headroom_mib: int = 256, allocate_mib: int = 1024) -> None:
    """Raise a genuine ``MemoryError``: cap the address space a little above what the process
    uses now, allocate past the cap, then lift the cap again (the soft limit only)."""
    import psutil  # the runtime already imports it

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + headroom_mib * _MIB
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        ballast = bytearray(allocate_mib * _MIB)  # raises MemoryError
        del ballast
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    raise AssertionError("the address-space limit did not stop a 1 GiB allocation")


def call_fault(fault: str) -> None:
    """Inject one of the ``*_mid_call`` faults, from a model thread."""
    # "After N chunks" means after they were sent: emit() only queues a frame for the loop.
    flush_from_thread()
    if fault == "segfault_mid_call":
        ctypes.string_at(0)  # a real SIGSEGV
        os.kill(os.getpid(), signal.SIGSEGV)  # pragma: no cover - in case address 0 reads
    elif fault == "sigkill_mid_call":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "hang_mid_call":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault == "garbage_mid_call":
        send_raw_from_thread(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
    elif fault == "oversize_mid_call":
        send_raw_from_thread(b"\xff\xff\xff\xf0")
    elif fault == "bomb_mid_call":
        count = 500_000
        body = b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count
        send_raw_from_thread(len(body).to_bytes(4, "big") + body)
    elif fault == "truncated_mid_call":
        send_raw_from_thread((1000).to_bytes(4, "big") + b"\x81" + b"\x00" * 9)
        time.sleep(0.05)
        os._exit(0)
    elif fault == "wrong_id_mid_call":
        send_raw_from_thread(encode(Chunk(id=_FORGED_ID, seq=0, data=b"stolen")))
    elif fault == "oom_mid_call":
        real_memory_error()
    # late_reply and flood shape the whole call instead; see SyntheticModel.call


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
    fmt = args.get("response_format", speech_formats.for_kind("synthetic").default)
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
