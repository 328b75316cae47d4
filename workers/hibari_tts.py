"""The ``hibari`` worker kind: a real English voice, offline, in 8 MB and a fraction of a second.

``hibari-tts`` (Apache-2.0) is a small ONNX network distilled from Kokoro-82M's ``af_heart``
voice, with an English G2P (lexicon, part-of-speech tagger and a tiny out-of-vocabulary net)
that needs neither spaCy nor espeak and writes Kokoro's own phoneme alphabet. The network
predicts a spectrum per frame and ``hibari.dsp`` turns it into 24 kHz samples. It is the
shipped default speech model because it is the only real English voice a fresh machine has.

It serves the same ``speech`` contract as the Kokoro kinds (:mod:`workers.speech`): text is cut
into sentences (long ones at clauses), each sentence is one ``session.run``, so a streamed
answer starts after the first sentence and a cancelled call stops between sentences.

Voices: each hibari voice is a whole model file (:mod:`workers.hibari_voices`). ``heart`` ships
in the package; the others are downloaded from Hugging Face once, into the data dir, only
when the user allowed it (``HF_HUB_OFFLINE=0``); otherwise asking for one is a clear error
that says how to get it. A request may name any voice on disk; its session is opened on first
use and kept (each costs ~15 MiB).

Reloads are cheap: the zygote imports onnxruntime and hibari and builds the American G2P once
(~0.4 s of lexicon and tagger tables, no weights), so a forked worker only opens its ONNX
session, from ONNX Runtime's optimised graph cached in the data dir (:mod:`workers.ort_cache`).

Recipe options (all optional)::

    voice    the default voice (default "heart"); its Kokoro name ("af_heart") works too
    threads  onnxruntime intra-op threads, 1..256 (default 1: the model is ~100x realtime
             on one core, and a second thread mostly spins)
    seed     integer: fixes the noise component, so the same text gives identical audio
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from workers import hibari_voices, recipe_options
from workers.base import (
    CallContext,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
    data_dir,
    invalid,
)
from workers.option_values import bad_config as _bad
from workers.ort_cache import cached_session
from workers.ort_setup import import_onnxruntime
from workers.protocol import WARMUP_OP, ErrorCode
from workers.speech import deliver, parse_speech_args

KIND = "hibari"
SAMPLE_RATE = 24000
#: hibari's own limit per forward pass; longer sentences are cut at clause punctuation.
MAX_PHONEMES = 400
_OPTIONS = recipe_options.HIBARI  # the one list: the supervisor checks recipes with it
_CLAUSE = re.compile(r"(?<=[,;:—])\s+")
_DOWNLOAD_TIMEOUT_S = 60


# ---------------------------------------------------------------------- G2P, once per process

_g2ps: dict[bool, Any] = {}
_g2p_lock = threading.Lock()


def shared_g2p(british: bool = False) -> Any:
    """This process's hibari G2P for one accent, built on first use and kept (no weights)."""
    with _g2p_lock:
        found = _g2ps.get(british)
        if found is None:
            from hibari.g2p import G2P

            found = _g2ps[british] = G2P(british=british)
        return found


# ---------------------------------------------------------------------- the kind


class HibariModel(Model):
    """hibari-tts through onnxruntime; one instance per worker process."""

    kind: ClassVar[str] = KIND
    zygote_imports: ClassVar[tuple[str, ...]] = (
        "hibari", "hibari.tts", "hibari.dsp", "hibari.g2p", "soundfile",
    )

    @classmethod
    def prepare_zygote(cls) -> None:
        import_onnxruntime(cls.kind)  # with its cache dir set, as a load would
        super().prepare_zygote()
        shared_g2p(british=False)  # the bundled voice's accent

    def __init__(self) -> None:
        self._ort: Any = None
        self._threads = 1
        self._seed: int | None = None
        self._default = hibari_voices.DEFAULT_VOICE
        self._registry: dict[str, hibari_voices.Voice] = {}
        self._vocab: dict[str, int] = {}
        self._sessions: dict[str, Any] = {}
        self._sessions_lock = threading.Lock()
        self._g2p_lock = threading.Lock()  # the G2P keeps per-sentence state
        self._synth: Callable[..., Any] | None = None
        self._graph = ""

    # ------------------------------------------------------------------ load

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        options = request.options
        _OPTIONS.check(options)
        if options.get("type", "tts") != "tts":
            raise _bad("hibari kind serves only type 'tts'")
        if request.device not in ("auto", "cpu"):
            raise _bad(f"hibari runs on the CPU only (device 'auto' or 'cpu'), "
                       f"not {request.device!r:.40}")
        threads = options.get("threads", 1)
        if type(threads) is not int or not 1 <= threads <= 256:
            raise _bad(f"hibari option 'threads' must be an integer in 1..256, got {threads!r:.60}")
        seed = options.get("seed")
        if seed is not None and (type(seed) is not int or seed < 0):
            raise _bad(f"hibari option 'seed' must be a non-negative integer, got {seed!r:.60}")
        started = time.monotonic()
        self._threads, self._seed = threads, seed
        self._registry = hibari_voices.registry()
        if not self._registry:
            raise _bad("package hibari-tts is not installed: pip install hibari-tts")
        voice = options.get("voice", hibari_voices.DEFAULT_VOICE)
        if not isinstance(voice, str):
            raise _bad(f"hibari option 'voice' must be a string, got {voice!r:.60}")
        try:
            self._default = self._voice_name(voice)
        except ModelError as e:
            raise _bad(f"hibari option 'voice': {e.message}") from None

        ctx.progress(0.1, "importing onnxruntime and hibari")
        self._ort = import_onnxruntime(self.kind)
        import json

        from hibari import dsp

        self._synth = dsp.synth
        folder = hibari_voices.package_dir()
        assert folder is not None  # the registry above came from it
        self._vocab = json.loads((folder / "assets" / "vocab.json").read_text(encoding="utf-8"))
        ctx.progress(0.3, f"opening voice {self._default}")
        try:
            self._session(self._default, ctx.progress)
        except ModelError as e:
            raise _bad(f"hibari option 'voice': {e.message}") from None
        ctx.progress(0.7, "loading the English G2P")
        shared_g2p(self._registry[self._default].british)
        ctx.progress(1.0, "ready")
        return LoadResult(device="cpu", info={
            "type": "tts",
            "default_voice": self._default,
            "voices": hibari_voices.available(self._download_dir()),
            "threads": threads,
            "optimized_graph": self._graph,
            "sample_rate": SAMPLE_RATE,
            "load_seconds": round(time.monotonic() - started, 3),
        })

    # ------------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == "voices":
            return {"voices": hibari_voices.available(self._download_dir()),
                    "default": self._default}
        if op == WARMUP_OP:
            # The G2P's first sentence only. A forward pass warms nothing a request does not
            # pay for anyway (the same finding as kokoro-onnx's warmup).
            return {"warmed_up": True, "phonemes": sum(len(p) for p in self._phonemes(
                "Hello.", self._registry[self._default].british))}
        if op != "speech":
            raise ModelError(ErrorCode.UNSUPPORTED,
                             f"hibari supports ops speech, voices and warmup, not {op!r:.40}")
        request = parse_speech_args(args)
        voice = self._voice_name(request.voice) if request.voice is not None else self._default
        session = self._session(voice, None)
        return deliver(self._synthesize(session, voice, request.text, request.speed, ctx),
                       request, SAMPLE_RATE, ctx)

    def _voice_name(self, name: str) -> str:
        """A registry name from a hibari name or the Kokoro name it was distilled from."""
        if name in self._registry:
            return name
        for voice in self._registry.values():
            if voice.kokoro == name:
                return voice.name
        raise invalid(f"voice {name!r} is not a hibari voice; known: "
                      f"{', '.join(sorted(self._registry))} (available here: "
                      f"{', '.join(hibari_voices.available(self._download_dir())) or 'none'})")

    def _download_dir(self) -> Path:
        return data_dir(self.kind) / "voices"

    def _session(self, voice: str, progress: Callable[[float | None, str], None] | None) -> Any:
        """The voice's ONNX session, opened (and downloaded, where allowed) on first use."""
        with self._sessions_lock:
            found = self._sessions.get(voice)
            if found is not None:
                return found
            spec = self._registry[voice]
            path = hibari_voices.voice_file(spec, self._download_dir())
            if path is None:
                path = self._download(spec, progress)
            ort = self._ort

            def session_options() -> Any:
                options = ort.SessionOptions()
                options.intra_op_num_threads = self._threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                # Idle ORT threads spin by default, stealing CPU from the other workers.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                return options

            try:
                session, self._graph = cached_session(ort, path, data_dir(self.kind),
                                                      session_options, ["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own untyped errors
                raise ModelError(ErrorCode.INTERNAL,
                                 f"hibari voice {voice!r}: {path} is not a loadable ONNX model: "
                                 f"{e}"[:600]) from None
            self._sessions[voice] = session
            return session

    def _download(self, voice: hibari_voices.Voice,
                  progress: Callable[[float | None, str], None] | None) -> Path:
        dest = self._download_dir() / voice.file
        if not hibari_voices.downloads_allowed():
            raise invalid(
                f"voice {voice.name!r} is not in the hibari-tts package and has not been "
                f"downloaded, and downloads are off (HF_HUB_OFFLINE=1). Start the server with "
                f"HF_HUB_OFFLINE=0 to fetch it once ({voice.size / 1e6:.1f} MB from "
                f"huggingface.co), or put {voice.file} in {dest.parent}")
        if progress is not None:
            progress(None, f"downloading voice {voice.name} ({voice.size / 1e6:.1f} MB)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{voice.file}.", dir=dest.parent)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                    hibari_voices.BASE_URL + voice.file, timeout=_DOWNLOAD_TIMEOUT_S) as answer:
                while block := answer.read(1 << 20):
                    out.write(block)
                    digest.update(block)
            if digest.hexdigest() != voice.sha256:
                raise ModelError(ErrorCode.INTERNAL,
                                 f"hibari voice {voice.name!r}: the download's sha256 does not "
                                 "match the package's registry; not using it")
            os.replace(tmp, dest)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise ModelError(ErrorCode.INTERNAL,
                             f"hibari voice {voice.name!r} could not be downloaded ({e}); put "
                             f"{voice.file} in {dest.parent} by hand") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    # ------------------------------------------------------------------ synthesis

    def _phonemes(self, text: str, british: bool) -> Iterator[str]:
        """Phoneme strings of at most :data:`MAX_PHONEMES`, one sentence (or clause) each."""
        from hibari import Hibari

        g2p = shared_g2p(british)
        for sentence in Hibari.split_sentences(text):
            with self._g2p_lock:
                phonemes = (g2p(sentence) or "").strip()
            yield from _cut(phonemes)

    def _synthesize(self, session: Any, voice: str, text: str, speed: float,
                    ctx: CallContext) -> Iterator[np.ndarray[Any, Any]]:
        rng = np.random.default_rng(self._seed)
        assert self._synth is not None
        for phonemes in self._phonemes(text, self._registry[voice].british):
            ctx.check_cancelled()
            ids = [0, *(self._vocab[c] for c in phonemes if c in self._vocab), 0]
            if len(ids) < 3:
                continue
            out = session.run(None, {"ids": np.asarray([ids], np.int64),
                                     "speed": np.asarray([speed], np.float32)})
            yield np.asarray(self._synth(*(o[0] for o in out), rng), dtype=np.float32)


def _cut(phonemes: str) -> Iterator[str]:
    """Cut one sentence's phonemes at clause punctuation, then at spaces, to the limit."""
    current = ""
    for part in _CLAUSE.split(phonemes):
        while len(part) > MAX_PHONEMES:  # a clause longer than the limit: cut at a space
            cut = part.rfind(" ", 0, MAX_PHONEMES)
            cut = cut if cut > 0 else MAX_PHONEMES
            if current:
                yield current
                current = ""
            yield part[:cut].strip()
            part = part[cut:].strip()
        if current and len(current) + len(part) + 1 > MAX_PHONEMES:
            yield current
            current = part
        else:
            current = f"{current} {part}" if current else part
    if current:
        yield current
