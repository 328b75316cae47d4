"""ONNX Runtime sessions that skip graph optimisation on every load after the first.

Creating an ``InferenceSession`` for the int8 Kokoro graph spends ~1 s on this machine
optimising the graph (constant folding, fusions, layout changes), and every worker process
pays it again, although the result depends only on the source file, the onnxruntime build,
the CPU and the session's optimisation settings. So the first load writes ORT's optimised
graph into the kind's data dir, and later loads open that file with optimisation turned off
(~0.25 s).

The cache file's name carries a key of everything the optimised graph depends on: the
source's path, size and modification time, the onnxruntime version, the CPU (model and
feature flags: the ``ORT_ENABLE_ALL`` level adds CPU-specific layouts), the providers and
the optimisation level. A changed source or library gives a new key, so a stale graph is
never opened; files of older keys for the same source are removed when a new one is written.

A cache file is trusted only with its sidecar: the sha256 of the file, written after the
file itself was renamed into place. A missing sidecar (a crash mid-write), a checksum that
does not match (a corrupt file) or a file onnxruntime refuses is removed and rebuilt from the
source, so the load still succeeds. Only CPU-only sessions are cached; a session with the
CUDA provider is built from the source as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from workers.atomic_write import write_text_atomically

log = logging.getLogger(__name__)

#: Bumped when the layout of the cache changes, so older files are never read.
CACHE_FORMAT = 1
_BLOCK = 8 * 1024 * 1024


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU's model name and feature flags (what a CPU-specific graph depends on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    found = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in wanted and name not in found:
            found[name] = value.strip()
    return f"{platform.machine()} " + " | ".join(f"{k}={found[k]}" for k in sorted(found))


def cache_key(source: Path, ort_version: str, providers: Sequence[Any], level: str) -> str:
    stat = source.stat()
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, str(source.resolve()), stat.st_size, stat.st_mtime_ns,
                 ort_version, cpu_signature(), repr(list(providers)), level):
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)


def cached_session(ort: Any, source: Path, cache_dir: Path,
                   make_options: Callable[[], Any],
                   providers: Sequence[Any]) -> tuple[Any, str]:
    """An ``InferenceSession`` for ``source`` and how it was made.

    ``make_options`` returns fresh ``SessionOptions`` (threads and so on) each time it is
    called. The second value is ``"cache"`` (opened from the optimised graph), ``"built"``
    (optimised now and written to the cache), or ``"uncached"`` (not cacheable: a provider
    other than the CPU, or a cache dir that cannot be written).
    """
    if [p if isinstance(p, str) else p[0] for p in providers] != ["CPUExecutionProvider"]:
        return ort.InferenceSession(str(source), sess_options=make_options(),
                                    providers=list(providers)), "uncached"
    options = make_options()
    level = str(options.graph_optimization_level)
    key = cache_key(source, ort.__version__, providers, level)
    target = cache_dir / f"{source.stem}.{key}.optimized.onnx"
    stamp = target.with_name(target.name + ".sha256")
    if target.exists():
        problem = _check(target, stamp)
        if problem is None:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return ort.InferenceSession(str(target), sess_options=options,
                                            providers=list(providers)), "cache"
            except Exception as e:  # onnxruntime raises its own untyped errors
                problem = f"onnxruntime cannot open it ({str(e)[:200]})"
            options = make_options()
        log.warning("optimised-graph cache %s is unusable (%s); rebuilding it from %s",
                    target.name, problem, source.name)
        _remove(target, stamp)
    return _build(ort, source, target, stamp, options, providers)


def _check(target: Path, stamp: Path) -> str | None:
    """Why the cache file must not be opened, or None when it is intact."""
    try:
        expected = stamp.read_text().strip()
    except FileNotFoundError:
        return "no checksum beside it: it was never completely written"
    except OSError as e:
        return f"its checksum cannot be read: {e}"
    try:
        actual = file_sha256(target)
    except OSError as e:
        return f"it cannot be read: {e}"
    if actual != expected:
        return "its checksum does not match: the file is corrupt"
    return None


def _build(ort: Any, source: Path, target: Path, stamp: Path, options: Any,
           providers: Sequence[Any]) -> tuple[Any, str]:
    try:
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".",
                                         suffix=".part.onnx")
    except OSError as e:  # a cache that cannot be written costs speed, never the load
        log.warning("cannot cache the optimised graph of %s in %s: %s", source.name,
                    target.parent, e)
        return ort.InferenceSession(str(source), sess_options=options,
                                    providers=list(providers)), "uncached"
    os.close(fd)
    temp = Path(temp_name)
    options.optimized_model_filepath = temp_name
    # ORT warns that an ORT_ENABLE_ALL graph is specific to this machine; the cache key
    # already carries the CPU and the library version, so that warning says nothing here.
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(source), sess_options=options,
                                       providers=list(providers))
    except BaseException:
        _remove(temp)
        raise
    try:
        if temp.stat().st_size == 0:
            raise OSError("onnxruntime wrote no optimised graph")
        digest = file_sha256(temp)
        os.replace(temp, target)
        write_text_atomically(stamp, digest + "\n")
    except OSError as e:
        _remove(temp, target, stamp)
        log.warning("cannot cache the optimised graph of %s in %s: %s", source.name,
                    target.parent, e)
        return session, "uncached"
    for old in target.parent.glob(f"{source.stem}.*.optimized.onnx*"):
        if old not in (target, stamp) and not old.name.endswith(".part.onnx"):
            _remove(old)
    return session, "built"
