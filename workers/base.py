"""The interface a worker kind implements.

A kind is a class with a no-argument constructor. The runtime creates one instance per worker
process, calls :meth:`Model.load` once, then :meth:`Model.call` for each request (possibly
from several threads at once, up to the recipe's ``max_concurrency``), and exits the process
to unload: there is no ``unload`` method, because ending the process is what returns memory.

Model code is synchronous and runs in worker threads; it reports progress, streams chunks and
notices cancellation through the small context objects below, so it never touches asyncio.
"""

from __future__ import annotations

import importlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from workers.protocol import ErrorCode


class ModelError(Exception):
    """A failure the model can name; ``code`` is one of :class:`workers.protocol.ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(Exception):
    """Raised inside a call when the supervisor asked to stop it."""


@dataclass(frozen=True)
class LoadRequest:
    name: str
    type: str
    device: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class LoadResult:
    device: str  # the device actually used ("cpu", "cuda:0", ...)
    info: Mapping[str, Any] = field(default_factory=dict)


class LoadContext:
    """Lets ``load`` report progress (``fraction`` in [0, 1]; the message names the phase;
    byte counts where the phase is counted in bytes, ``total_bytes`` None when unknown)."""

    def __init__(self, report: Callable[..., None]) -> None:
        self._report = report

    def progress(self, fraction: float | None = None, message: str = "", *,
                 done_bytes: int | None = None, total_bytes: int | None = None) -> None:
        if done_bytes is None and total_bytes is None:
            self._report(fraction, message)
        else:
            self._report(fraction, message, done_bytes=done_bytes, total_bytes=total_bytes)


class CallContext:
    """Lets ``call`` stream chunks and notice cancellation."""

    def __init__(self, emit: Callable[[Any], None], cancelled: threading.Event) -> None:
        self._emit = emit
        self._cancelled = cancelled

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled()

    def emit(self, data: Any) -> None:
        """Send one chunk (bytes, str or a small map) to the supervisor, in order."""
        self.check_cancelled()
        self._emit(data)

    def sleep(self, seconds: float) -> None:
        """Sleep that wakes up early, raising :class:`Cancelled`, if the call is cancelled."""
        if self._cancelled.wait(seconds):
            raise Cancelled()


class Model(ABC):
    """One loaded model inside one worker process."""

    #: The kind name recipes use (``recipe = "synthetic"``).
    kind: ClassVar[str] = ""

    @abstractmethod
    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        """Load weights; raise :class:`ModelError` (``bad_config`` for recipe mistakes)."""

    @abstractmethod
    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        """Run one request; stream with ``ctx.emit``; return the small final result."""

    def vram_bytes(self) -> int:
        """Device memory this process holds (0 on CPU); sampled on every ping."""
        return 0

    #: Modules this kind's zygote imports once, so that workers forked from it start with
    #: them loaded (see :mod:`workers.zygote`). Importing them must not touch a GPU, start a
    #: Python thread, run a parallel op or read weights: all of that belongs to ``load``.
    zygote_imports: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def prepare_zygote(cls) -> None:
        """Run in the zygote before it forks any worker; override for more than imports."""
        for name in cls.zygote_imports:
            importlib.import_module(name)


def check_options(kind: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse unknown recipe options by name (a typo must not be silently ignored)."""
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        raise ModelError(
            ErrorCode.BAD_CONFIG,
            f"unknown {kind} option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}",
        )


def invalid(message: str) -> ModelError:
    """Shorthand for the common 400-class error."""
    return ModelError(ErrorCode.INVALID_REQUEST, message)


def data_dir(kind: str) -> Path:
    """This kind's cache folder under the supervisor's data dir (created on first use).

    Kinds keep what is expensive to rebuild here (converted weights, assembled models) instead
    of a library's default cache in the user's home. Without a supervisor (a kind run by hand)
    it falls back to ``.lemonade`` in the working directory.
    """
    base = Path(os.environ.get("LEMONADE_DATA_DIR") or ".lemonade")
    path = base / kind
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
