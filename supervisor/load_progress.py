"""Where a load in progress stands, and when that is worth a line in the server log.

A first load can take a minute (a GGUF conversion, a download). Workers report progress
(``progress`` frames, and the bars their libraries draw, see :mod:`supervisor.worker_output`);
the manager's :class:`ProgressBoard` keeps one :class:`LoadProgress` per loading model from
the moment the load begins until its task ends, status shows it, events carry each report,
and this module decides when it goes to the log: on a phase change, when the fraction moved by
:data:`LOG_EVERY_FRACTION`, or when :data:`LOG_EVERY_S` passed since the last line, but never
more often than :data:`MIN_LOG_GAP_S`; and a load that reports nothing at all still gets a
"still loading" line every :data:`QUIET_LOG_S`. The clock is handed in, so the rules are
tested without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.events import EventBus
from supervisor.units import format_bytes
from supervisor.worker_output import Bar

log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0
LOG_EVERY_FRACTION = 0.1
MIN_LOG_GAP_S = 1.0
QUIET_LOG_S = 10.0
_MAX_PHASE_CHARS = 200


@dataclass
class LoadProgress:
    """One load's latest progress report; times are on the clock the caller hands in."""

    started: float
    phase: str = "starting the worker"
    fraction: float | None = None
    done_bytes: int | None = None
    total_bytes: int | None = None
    updated: float = field(default=0.0)
    reports: int = 0
    _logged_at: float = -math.inf
    _logged_phase: str | None = None
    _logged_fraction: float | None = None
    _quiet_timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.updated = self.started

    def watch(self, loop: asyncio.AbstractEventLoop, emit: Callable[[str], None], *,
              tick_s: float = 1.0) -> None:
        """Until :meth:`stop`: ``emit`` a "still loading" summary whenever the load has been
        quiet for :data:`QUIET_LOG_S`. A timer handle, not a task: stopping it is immediate."""
        def tick() -> None:
            now = loop.time()
            if self.quiet_due(now):
                emit(self.summary(now))
            self._quiet_timer = loop.call_later(tick_s, tick)

        self.stop()
        self._quiet_timer = loop.call_later(tick_s, tick)

    def stop(self) -> None:
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None

    def update(self, now: float, fraction: float | None, phase: str, *,
               done_bytes: int | None = None, total_bytes: int | None = None) -> bool:
        """Take a report; True when it should be logged now (then it counts as logged)."""
        phase = " ".join(phase.split())[:_MAX_PHASE_CHARS]
        if phase:
            self.phase = phase
        if fraction is not None or phase:  # a new phase without a fraction: not known yet
            self.fraction = fraction
        self.done_bytes, self.total_bytes = done_bytes, total_bytes
        self.updated = now
        self.reports += 1
        if now - self._logged_at < MIN_LOG_GAP_S:
            return False
        moved = (self.fraction is not None and (
            self._logged_fraction is None
            or abs(self.fraction - self._logged_fraction) >= LOG_EVERY_FRACTION))
        due = (self.phase != self._logged_phase or moved or now - self._logged_at >= LOG_EVERY_S)
        if due:
            self.mark_logged(now)
        return due

    def quiet_due(self, now: float) -> bool:
        """Whether the log has heard nothing of this load for :data:`QUIET_LOG_S` (then the
        line about to be written counts as logged)."""
        if now - max(self._logged_at, self.started) < QUIET_LOG_S:
            return False
        self.mark_logged(now)
        return True

    def mark_logged(self, now: float) -> None:
        self._logged_at = now
        self._logged_phase = self.phase
        self._logged_fraction = self.fraction

    def describe(self, now: float) -> dict[str, Any]:
        """The ``progress`` object of a loading model in ``/api/v1/status``."""
        return {
            "phase": self.phase,
            "fraction": None if self.fraction is None else round(self.fraction, 4),
            "elapsed_s": round(max(0.0, now - self.started), 1),
            "since_update_s": round(max(0.0, now - self.updated), 1),
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
        }

    def summary(self, now: float) -> str:
        """``phase (45%, 1.2 GiB of 2.5 GiB, 12.0s)``: the log's and the CLI's wording."""
        return summarize(self.describe(now))


def summarize(progress: dict[str, Any]) -> str:
    """One line for a ``progress`` object as :meth:`LoadProgress.describe` makes it."""
    parts = []
    if progress.get("fraction") is not None:
        parts.append(f"{progress['fraction'] * 100:.0f}%")
    done, total = progress.get("done_bytes"), progress.get("total_bytes")
    if done is not None:
        parts.append(f"{format_bytes(done)} of {format_bytes(total)}" if total is not None
                     else format_bytes(done))
    parts.append(f"{progress.get('elapsed_s', 0):.1f}s")
    return f"{progress.get('phase') or 'loading'} ({', '.join(parts)})"


class ProgressBoard:
    """The progress of every load in progress, by model name."""

    def __init__(self, events: EventBus) -> None:
        self._events = events
        self._loads: dict[str, LoadProgress] = {}

    def get(self, name: str) -> LoadProgress | None:
        return self._loads.get(name)

    def begin(self, name: str, kind: str, task: asyncio.Future[Any]) -> None:
        """A load of ``name`` starts; its progress is kept (and logged) until ``task`` ends."""
        loop = asyncio.get_running_loop()
        progress = LoadProgress(started=loop.time())
        self._loads[name] = progress
        log.info("loading %s (kind %s)", name, kind)
        progress.watch(loop, lambda summary: log.info("still loading %s: %s", name, summary))

        def done(_task: asyncio.Future[Any]) -> None:
            progress.stop()
            if self._loads.get(name) is progress:
                del self._loads[name]

        task.add_done_callback(done)

    def report(self, name: str, fraction: float | None, message: str, *,
               done_bytes: int | None = None, total_bytes: int | None = None) -> bool:
        """A progress report for the load of ``name``: kept, published as a ``progress``
        event, and logged at a readable rate. False when no load of ``name`` runs."""
        progress = self._loads.get(name)
        if progress is None:
            return False
        now = asyncio.get_running_loop().time()
        if progress.update(now, fraction, message, done_bytes=done_bytes,
                           total_bytes=total_bytes):
            log.info("loading %s: %s", name, progress.summary(now))
        self._events.publish("progress", name, fraction=fraction, message=message,
                             done_bytes=done_bytes, total_bytes=total_bytes)
        return True

    def take_bar(self, name: str, bar: Bar) -> bool:
        """A progress bar the worker drew (:data:`supervisor.worker_output.BarSink`)."""
        return self.report(name, bar.fraction, bar.desc, done_bytes=bar.done_bytes,
                           total_bytes=bar.total_bytes)
