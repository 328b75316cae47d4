"""The modules a kind's loads import lazily, learned from its workers and imported by its zygote.

A zygote imports its kind's top-level modules (``Model.zygote_imports``), but libraries defer
most of their work to first use: ``transformers`` imports a model's modelling code, its
tokenizer classes and ``torch.distributed`` inside ``from_pretrained``, spaCy imports its
registered plugins inside ``spacy.load``. Measured here, that is 4-6 s of every forked
worker's first load, against ~0.2 s for the same load repeated in a warm process. Which
modules a load pulls in depends on the model (a BERT encoder imports other code than a Llama
decoder), so instead of a hand-kept list per model, every forked worker records what its load
and warmup imported, and its zygote imports the same:

* :func:`learn` runs in a forked worker after its load and after its warmup: the modules now
  in ``sys.modules`` that were not there when it was forked are added to the kind's manifest,
  ``data_dir(kind)/zygote-imports.json`` (written to a temporary file and renamed, so a reader
  sees the old list or the new one, never half of one);
* the zygote imports them at start (:func:`import_learned`) and again whenever the supervisor
  says a worker finished loading (``learn`` on the control socket), then one module at a
  time between its other work (:func:`pending`, :func:`import_one`), so that it keeps
  forking and reaping meanwhile; modules already imported cost nothing, and one that no
  longer imports (a library was upgraded) is skipped and dropped from the manifest.

A manifest that is not valid JSON of the expected shape, or that was written by another
Python version, is ignored and rewritten by the next worker. A module whose import makes
forking unsafe (it starts a thread or initialises CUDA) is caught by the zygote's own checks;
the manifest is then set aside (renamed ``zygote-imports.rejected.json``, with the reason) and
no longer learned, and the kind's next zygote starts without it.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.atomic_write import write_text_atomically
from workers.base import data_dir

log = logging.getLogger(__name__)

MANIFEST = "zygote-imports.json"
REJECTED = "zygote-imports.rejected.json"
FORMAT = 1
#: A sanity bound: a manifest longer than this is not one a worker wrote.
MAX_MODULES = 50_000


def _python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def manifest_path(kind: str) -> Path:
    return data_dir(kind) / MANIFEST


def rejected_path(kind: str) -> Path:
    return data_dir(kind) / REJECTED


def read(kind: str) -> list[str]:
    """The learned module names, or ``[]`` when there is no usable manifest."""
    path = manifest_path(kind)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s); the next load rewrites it", path, e)
        return []
    modules = data.get("modules") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != FORMAT
            or data.get("python") != _python() or not isinstance(modules, list)
            or len(modules) > MAX_MODULES
            or not all(isinstance(m, str) and m for m in modules)):
        log.warning("ignoring %s (not a manifest this worker wrote); the next load rewrites it",
                    path)
        return []
    return modules


def _importable(name: str, module: Any) -> bool:
    """A module that ``import_module(name)`` can bring back: found through the import system
    under its own name (not a placeholder, not one a library built in memory)."""
    if module is None or name == "__main__" or name.startswith("__mp_main__"):
        return False
    spec = getattr(module, "__spec__", None)
    return spec is not None and getattr(spec, "name", None) == name


def learn(kind: str, before: Iterable[str]) -> int:
    """Add what this process imported since ``before`` to the manifest; how many were new.

    Never raises: a manifest that cannot be written only means slower forks.
    """
    try:
        if rejected_path(kind).exists():
            return 0
        seen = set(before)
        fresh = [name for name, module in list(sys.modules.items())
                 if name not in seen and _importable(name, module)]
        if not fresh:
            return 0
        known = read(kind)
        have = set(known)
        added = [name for name in fresh if name not in have]
        if not added:
            return 0
        _write(manifest_path(kind), {"format": FORMAT, "python": _python(),
                                     "modules": (known + added)[:MAX_MODULES]})
        return len(added)
    except Exception as e:
        log.warning("could not record the modules this load imported: %s", e)
        return 0


def pending(kind: str) -> list[str]:
    """The manifest's modules not imported in this process yet, in the order learned."""
    return [name for name in read(kind) if name not in sys.modules]


def import_one(name: str) -> bool:
    """Import one learned module; False when it no longer imports (an upgraded library)."""
    try:
        importlib.import_module(name)
    except Exception as e:
        log.debug("learned module %s does not import: %s: %s", name, type(e).__name__, e)
        return False
    return True


@dataclass
class Learning:
    """What one round of learned imports did (the zygote reports it)."""

    modules: int = 0  # newly imported
    failed: int = 0  # listed but not importable any more
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def take(self, kind: str, name: str, hazard: Callable[[str], str | None]) -> str | None:
        """Import one learned module, count it (one that no longer imports is dropped from
        the manifest), then ask ``hazard(name)``: why forking is now unsafe, or None."""
        if import_one(name):
            self.modules += 1
        else:
            self.failed += 1
            forget(kind, [name])
        return hazard(name)


def import_learned(kind: str, hazard: Callable[[str], str | None] = lambda _name: None,
                   ) -> tuple[Learning, str | None]:
    """Import every pending module, asking ``hazard(name)`` after each; stops at the first
    hazard and returns it (the process must then not fork)."""
    done = Learning()
    for name in pending(kind):
        found = done.take(kind, name, hazard)
        if found is not None:
            return done, found
    return done, None


def forget(kind: str, names: Iterable[str]) -> None:
    """Drop modules that no longer import (a library was upgraded) from the manifest."""
    gone = set(names)
    if not gone:
        return
    try:
        kept = [name for name in read(kind) if name not in gone]
        _write(manifest_path(kind), {"format": FORMAT, "python": _python(), "modules": kept})
    except OSError as e:
        log.warning("could not update %s: %s", manifest_path(kind), e)


def set_aside(kind: str, reason: str) -> Path:
    """Stop using the manifest: its imports made forking unsafe. Returns where it went."""
    path = rejected_path(kind)
    try:
        _write(path, {"reason": reason, "modules": read(kind)})
        manifest_path(kind).unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not set %s aside: %s", manifest_path(kind), e)
    return path


def _write(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data))
