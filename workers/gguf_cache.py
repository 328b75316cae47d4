"""GGUF -> Hugging Face folder conversion, cached on disk so that only the first load pays.

``transformers`` reads GGUF files by dequantizing every tensor in Python, which takes tens of
seconds even for a 135M-parameter model, and its ``from_pretrained(..., gguf_file=...)`` path
also wants ``accelerate``. Here the conversion is done once, without ``accelerate``: the
config and tokenizer come from the GGUF metadata, the tensors from
``load_gguf_checkpoint``, and the result is written with ``save_pretrained`` into
``<cache_root>/<key>``, where the key is derived from the file's name, size and modification
time (and the converter and transformers versions), so a changed file gets a fresh copy.

The copy is written into a temporary folder next to its final place and renamed into place
only when complete (a rename within one file system is atomic), so a crash mid-write leaves a
stray ``.tmp-`` folder (cleaned up by the next conversion), never a half-written cache that
looks usable. A file lock keeps two workers from converting the same file at once.

Progress is reported in phases, with byte counts where the work is counted in bytes (the
GGUF file read and de-quantized, the converted copy synced to disk); the de-quantizing itself
draws transformers' own progress bar, which the supervisor reads as load progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: Bump when the conversion below changes in a way that makes old copies wrong.
CONVERTER_VERSION = 1
COMPLETE_MARKER = ".lemonade-complete"
_STALE_TMP_S = 3600.0

#: Used when a GGUF carries no chat template: ChatML, which SmolLM2, Qwen and many others use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Progress(Protocol):
    """What :meth:`workers.base.LoadContext.progress` takes."""

    def __call__(self, fraction: float | None, message: str, /, *,
                 done_bytes: int | None = None, total_bytes: int | None = None) -> None: ...


def _no_progress(fraction: float | None, message: str, /, *, done_bytes: int | None = None,
                 total_bytes: int | None = None) -> None:
    pass


def cache_key(gguf_path: Path) -> str:
    """A folder name that changes whenever the file or the converter does."""
    import transformers

    stat = gguf_path.stat()
    identity = (
        f"{gguf_path.name}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}"
        f"|{transformers.__version__}"
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]
    return f"{stem}-{digest}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_folder(gguf_path: Path, cache_root: Path,
                     progress: Progress | None = None) -> tuple[Path, bool]:
    """The cached Hugging Face folder for ``gguf_path``: ``(folder, True)`` when it was
    already there, ``(folder, False)`` when it was converted now."""
    report: Progress = progress or _no_progress
    key = cache_key(gguf_path)
    target = cache_root / key
    if is_complete(target):
        return target, True
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / f".{key}.lock"):
        if is_complete(target):  # another worker finished it while we waited
            return target, True
        _remove_stale_tmp(cache_root, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
        try:
            convert(gguf_path, tmp, report)
            (tmp / COMPLETE_MARKER).write_text(f"{gguf_path}\n")
            _fsync_tree(tmp, report)
            if target.exists():  # an incomplete leftover from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
            _fsync_dir(cache_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target, False


def convert(gguf_path: Path, out: Path, report: Progress) -> None:
    """Write a Hugging Face folder (config, float weights, tokenizer) for one GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    size = gguf_path.stat().st_size
    started = time.monotonic()
    report(0.1, f"reading {name} (first load: converting GGUF, cached afterwards)",
           done_bytes=0, total_bytes=size)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    report(0.25, "reading the tokenizer from the GGUF metadata")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    report(0.4, "building the model")
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    report(0.5, "de-quantizing the GGUF tensors", done_bytes=0, total_bytes=size)
    parsed = load_gguf_checkpoint(  # type: ignore[no-untyped-call]
        str(gguf_path), return_tensors=True, model_to_load=model
    )
    state = parsed["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"GGUF tensors do not match the {config.model_type} model: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    report(0.8, f"de-quantized {len(state)} tensors", done_bytes=size, total_bytes=size)
    report(0.85, "writing the converted copy")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s in %.1fs", gguf_path, time.monotonic() - started)


def _remove_stale_tmp(cache_root: Path, key: str) -> None:
    """Leftovers of a conversion that crashed (we hold the lock, so none is in progress)."""
    for leftover in cache_root.glob(f".{key}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    now = time.time()
    for leftover in cache_root.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(folder: Path, report: Progress = _no_progress) -> None:
    """fsync every file (hundreds of MB of weights: seconds on a slow disk), reporting the
    bytes synced so far."""
    files = [(path, path.stat().st_size) for path in sorted(folder.iterdir()) if path.is_file()]
    total = sum(size for _, size in files)
    done = 0
    phase = "syncing the converted copy to disk"
    report(0.9, phase, done_bytes=0, total_bytes=total)
    for path, size in files:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        done += size
        report(0.9 + 0.09 * done / max(total, 1), phase, done_bytes=done, total_bytes=total)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
