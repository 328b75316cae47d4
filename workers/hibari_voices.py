"""Where the ``hibari`` kind's voices are, read without importing numpy or onnxruntime.

Each hibari voice is a complete 7.9 MB ONNX model (the same network distilled from a different
Kokoro voice). Only ``heart`` ships inside the ``hibari-tts`` package; the others are
downloaded from Hugging Face on first use. Offline (``HF_HUB_OFFLINE=1``, the default for
workers) a voice is usable only when its file is already on disk: in the package, in this
server's data dir (where the worker downloads to), or in hibari's own cache (where the
``hibari`` command downloads to).

This module reads the package's ``voices.json`` by path (``importlib.util.find_spec`` does not
run the package's ``__init__``, which imports numpy), so the supervisor can list the voices
of a model that is not loaded without loading it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "hibari"
DEFAULT_VOICE = "heart"
#: Where hibari fetches voices from (recorded in the package's registry by file name).
BASE_URL = "https://huggingface.co/maureesewilliams/hibari/resolve/main/voices/"


@dataclass(frozen=True)
class Voice:
    name: str
    kokoro: str  # the Kokoro voice it was distilled from, e.g. "af_heart"
    language: str
    gender: str
    file: str
    sha256: str
    size: int
    bundled: bool
    british: bool


def package_dir() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def registry() -> dict[str, Voice]:
    """Every voice hibari knows, by name; empty when the package is not installed."""
    folder = package_dir()
    if folder is None:
        return {}
    raw = json.loads((folder / "assets" / "voices.json").read_text(encoding="utf-8"))
    return {
        name: Voice(name=name, kokoro=str(v.get("kokoro", "")), language=str(v["language"]),
                    gender=str(v.get("gender", "")), file=str(v["file"]),
                    sha256=str(v["sha256"]), size=int(v.get("bytes", 0)),
                    bundled=bool(v.get("bundled")), british=bool(v.get("british")))
        for name, v in raw.items()
    }


def hibari_cache_dir() -> Path:
    """The folder the ``hibari`` command downloads voices into (HIBARI_HOME or the XDG cache)."""
    if os.environ.get("HIBARI_HOME"):
        return Path(os.environ["HIBARI_HOME"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / PACKAGE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / PACKAGE


def voice_file(voice: Voice, download_dir: Path | None) -> Path | None:
    """The voice's ONNX file on this machine, or None when it would have to be downloaded."""
    folder = package_dir()
    if voice.bundled and folder is not None:
        path = folder / "assets" / voice.file
        return path if path.is_file() else None
    for base in (download_dir, hibari_cache_dir()):
        if base is not None and (base / voice.file).is_file():
            return base / voice.file
    return None


def available(download_dir: Path | None) -> list[str]:
    """Names of the voices that can be used without a download, sorted."""
    return sorted(name for name, v in registry().items() if voice_file(v, download_dir))


def downloads_allowed() -> bool:
    """Workers run with ``HF_HUB_OFFLINE=1`` unless the user turned it off."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("1", "true", "yes", "on")
