"""What ``lemonade load`` and ``lemonade status`` show of a load in progress.

``POST /api/v1/load`` answers only when the model is ready, so while it runs
:class:`LoadWatcher` polls ``GET /api/v1/status`` from a thread and shows the model's
``progress`` (phase, fraction, bytes, elapsed; see :mod:`supervisor.load_progress`): one
redrawn ``\\r`` line with a bar on a terminal, a plain line per change otherwise (a log, a
pipe, CI). Polling status rather than reading the event stream keeps it simple and robust:
a missed poll costs nothing, and there is no stream to set up, resume or tear down.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from supervisor.load_progress import summarize

TTY_POLL_S = 0.5
PLAIN_POLL_S = 1.0
_BAR_WIDTH = 24


def state_cell(row: dict[str, Any]) -> str:
    """The STATE column of ``lemonade status``: ``loading 45%`` for a load in progress."""
    state = str(row["state"])
    progress = row.get("progress")
    if progress and progress.get("fraction") is not None:
        state += f" {progress['fraction'] * 100:.0f}%"
    if row.get("in_flight"):
        state += f" ({row['in_flight']} busy)"
    return state


def loading_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per loading model for under the status table: its phase, bytes, elapsed."""
    return [f"{row['name']}: {summarize(row['progress'])}" for row in rows if row.get("progress")]


def bar_line(name: str, progress: dict[str, Any], width: int) -> str:
    """``name [#########...............]  37% phase (...)`` cut to ``width`` characters."""
    fraction = progress.get("fraction")
    if fraction is None:
        bar = "[" + "?" * _BAR_WIDTH + "]"
    else:
        filled = round(fraction * _BAR_WIDTH)
        bar = "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]"
    return f"{name} {bar} {summarize(progress)}"[:max(10, width - 1)]


class LoadWatcher:
    """Shows a model's load progress while the ``with`` body (the load request) runs."""

    def __init__(self, name: str, fetch_status: Callable[[], Any], out: TextIO, *,
                 tty: bool | None = None) -> None:
        self._name = name
        self._fetch = fetch_status
        self._out = out
        self._tty = out.isatty() if tty is None else tty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-progress", daemon=True)
        self._last: tuple[Any, ...] | None = None
        self._drawn = False  # a \r line is on the terminal and must be cleared

    def __enter__(self) -> LoadWatcher:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5.0)
        if self._drawn:
            self._out.write("\r\033[K")  # the final message replaces the bar
            self._out.flush()

    def _run(self) -> None:
        interval = TTY_POLL_S if self._tty else PLAIN_POLL_S
        while not self._stop.wait(interval):
            try:
                progress = self._progress()
            except Exception:  # the server is busy or gone: the load request will say so
                continue
            if progress is not None and not self._stop.is_set():
                self._show(progress)

    def _progress(self) -> dict[str, Any] | None:
        for row in self._fetch()["models"]:
            if row["name"] == self._name:
                progress = row.get("progress")
                return progress if isinstance(progress, dict) else None
        return None

    def _show(self, progress: dict[str, Any]) -> None:
        if self._tty:
            width = shutil.get_terminal_size((80, 24)).columns
            self._out.write("\r\033[K" + bar_line(self._name, progress, width))
            self._drawn = True
        else:
            # A line per change, not per poll: a stalled phase does not repeat itself.
            fraction = progress.get("fraction")
            key = (progress.get("phase"), None if fraction is None else round(fraction, 2),
                   progress.get("done_bytes"))
            if key == self._last:
                return
            self._last = key
            self._out.write(f"loading {self._name}: {summarize(progress)}\n")
        self._out.flush()
