"""A worker's stdout and stderr, turned into log records that read well.

Workers log through :func:`workers.runtime.setup_logging` as ``LEVEL origin: message``; the
libraries they load also print raw text and draw progress bars (tqdm, huggingface_hub) by
rewriting one terminal line with ``\\r``. Forwarding that line by line at INFO gave doubled
prefixes (``INFO supervisor.worker: [m] WARNING transformers: ...``) and one enormous line at
the end of every bar. Here:

* bytes are cut into lines at ``\\n`` *and* ``\\r``, each line at most :data:`MAX_LINE_BYTES`
  (the rest of a longer one is counted, not kept), so a worker that writes 100 MB without a
  newline costs the supervisor one bounded buffer, not 100 MB;
* a line that names its level is logged at that level, once, as ``[model] origin: message``;
  unprefixed lines (raw prints) are INFO, except the lines that arrive in the same read as
  a levelled one (a traceback under ``log.exception``), which keep its level;
* a tqdm-style bar (``desc: NN%|####| a/b [...]``) becomes the model's load progress through
  a callback while the model loads, at most every :data:`BAR_PROGRESS_INTERVAL_S`; when no
  load takes it (a bar during a call), it is logged at most every :data:`BAR_LOG_INTERVAL_S`.
  Other ``\\r``-rewritten lines are logged at that rate too. The newest update is kept and
  logged before the next ordinary line, so the log always ends with the bar's final state.

:func:`forward_output` is what :mod:`supervisor.process` and :mod:`supervisor.zygote` run per
pipe; :class:`OutputForwarder` is the part that needs no event loop (unit-tested directly).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

worker_log = logging.getLogger("supervisor.worker")

#: Longest line kept, in bytes; the rest is dropped and counted in a note at the end.
MAX_LINE_BYTES = 8192
#: Characters of each line kept in the tail that error messages quote.
TAIL_LINE_CHARS = 500
READ_CHUNK_BYTES = 64 * 1024
#: A bar that feeds a load's progress: at most this often (its newest state is kept).
BAR_PROGRESS_INTERVAL_S = 0.25
#: A bar (or another rewritten line) that only goes to the log: at most this often.
BAR_LOG_INTERVAL_S = 5.0

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
#: ``LEVEL origin: message``, the format of workers.runtime.LOG_FORMAT.
_LEVELLED = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.<>\-]{1,200}): (.*)", re.S)
_SEPARATOR = re.compile(rb"\r\n|\r|\n")
#: tqdm's default layout: ``{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{rest}]``.
_BAR = re.compile(
    r"(?:(?P<desc>.*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*"
    r"(?P<n>\d+(?:\.\d+)?[kMGTPEZY]?)/(?P<total>\d+(?:\.\d+)?[kMGTPEZY]?)"
    r"\s*(?:\[(?P<rest>[^\]]*)\])?"
)
_SCALE = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Z": 10**21, "Y": 10**24}


@dataclass(frozen=True)
class Bar:
    """One update of a progress bar drawn by a library inside the worker."""

    text: str
    desc: str
    fraction: float
    #: Set when the bar counts bytes (its rate is in B/s); tqdm rounds scaled counts
    #: ("1.23G"), so these are approximate.
    done_bytes: int | None = None
    total_bytes: int | None = None

    @property
    def complete(self) -> bool:
        return self.fraction >= 1.0


#: Takes a bar as load progress; returns False when no load takes it (log it instead).
BarSink = Callable[[Bar], bool]


def parse_bar(text: str) -> Bar | None:
    """The bar in ``text`` if it is a tqdm-style update, else None."""
    return split_bar(text)[0]


def split_bar(text: str) -> tuple[Bar | None, str]:
    """A tqdm-style update at the start of ``text``, and the text after it: a line logged
    while a bar is drawn lands right after the bar, on the same terminal line."""
    text = text.strip()
    match = _BAR.match(text)
    if match is None or int(match["pct"]) > 100:
        return None, text
    percent = int(match["pct"])
    done, total = _count(match["n"]), _count(match["total"])
    rest = match["rest"] or ""
    fraction = done / total if total else percent / 100
    bar = Bar(text=text[:match.end()].strip(), desc=(match["desc"] or "").strip(),
              fraction=min(1.0, max(0.0, fraction)))
    if "B/s" in rest or "s/B" in rest:
        total_bytes = round(total)
        bar = Bar(bar.text, bar.desc, bar.fraction, min(round(done), total_bytes), total_bytes)
    return bar, text[match.end():].strip()


def _count(text: str) -> float:
    if text[-1] in _SCALE:
        return float(text[:-1]) * _SCALE[text[-1]]
    return float(text)


def parse_level(line: str) -> tuple[int, str, str] | None:
    """``(level, origin, message)`` of a ``LEVEL origin: message`` line, else None."""
    match = _LEVELLED.fullmatch(line)
    if match is None:
        return None
    return _LEVELS[match[1]], match[2], match[3]


def printable(line: str) -> str:
    """Worker output goes into our log: escape control characters against log injection."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)


class LineSplitter:
    """Cuts a byte stream into lines at ``\\n``, ``\\r\\n`` and ``\\r``, with bounded memory.

    ``feed`` returns ``(line, rewritten)`` pairs: ``rewritten`` is True for a line that ended
    in a bare ``\\r`` (the writer will draw over it). A line longer than ``max_bytes`` keeps
    its first ``max_bytes`` and a note of how many bytes were dropped. A ``\\r\\n`` split
    between two reads ends its line as a rewrite, at once (a bar's newest state must not
    wait for the next write); the ``\\n`` that follows is then no line of its own.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_bytes
        self._buffer = bytearray()
        self._dropped = 0
        self._after_cr = False  # the last read ended in "\r"

    def feed(self, data: bytes) -> list[tuple[str, bool]]:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        out = []
        start = 0
        for match in _SEPARATOR.finditer(data):
            self._take(data[start:match.start()])
            out.append((self._finish(), match.group() == b"\r"))
            start = match.end()
        self._take(data[start:])
        return out

    def close(self) -> list[tuple[str, bool]]:
        """What is left when the stream ends (a last line without a newline)."""
        if self._buffer or self._dropped:
            return [(self._finish(), False)]
        return []

    def _take(self, piece: bytes) -> None:
        room = self._max - len(self._buffer)
        if room > 0:
            self._buffer += piece[:room]
        self._dropped += max(0, len(piece) - max(room, 0))

    def _finish(self) -> str:
        line = self._buffer.decode("utf-8", "replace")
        if self._dropped:
            line += f" ... [{self._dropped} more bytes of this line dropped]"
        self._buffer = bytearray()
        self._dropped = 0
        return line


class OutputForwarder:
    """Turns one pipe's bytes into log records (see the module docstring for the rules)."""

    def __init__(self, name: str, tail: collections.deque[str], *,
                 on_bar: BarSink | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._tail = tail
        self._on_bar = on_bar
        self._clock = clock
        self._splitter = LineSplitter()
        self._pending: tuple[str, Bar | None] | None = None  # the newest unsent rewrite
        self._pending_since = 0.0
        self._last_rewrite_at = -math.inf
        self._bars_taken = on_bar is not None  # whether the last bar went to a load

    def feed(self, data: bytes) -> None:
        inherited: int | None = None  # the level a continuation line in this read keeps
        for raw, rewritten in self._splitter.feed(data):
            inherited = self._line(raw, rewritten, inherited)

    def close(self) -> None:
        for raw, rewritten in self._splitter.close():
            self._line(raw, rewritten, None)
        self._flush_pending()

    def _line(self, raw: str, rewritten: bool, inherited: int | None) -> int | None:
        line = printable(raw).rstrip()  # leading blanks stay: a traceback's indentation
        if not line.strip():
            return inherited
        bar, after = split_bar(line)
        if bar is not None:
            self._rewrite(bar.text, bar, final=not rewritten and not after)
            if not after:
                return inherited
            line = after
        elif rewritten and parse_level(line) is None:
            self._rewrite(line.strip(), None, final=False)
            return inherited
        self._flush_pending()
        self._tail.append(line[:TAIL_LINE_CHARS])
        parsed = parse_level(line)
        if parsed is not None:
            level, origin, message = parsed
            worker_log.log(level, "[%s] %s: %s", self.name, origin, message)
            return level
        worker_log.log(logging.INFO if inherited is None else inherited, "[%s] %s",
                       self.name, line)
        return inherited

    def _rewrite(self, line: str, bar: Bar | None, *, final: bool) -> None:
        """A bar update or another line the writer draws over: keep the newest, send it
        at the rate its destination allows, and always send a final one."""
        now = self._clock()
        if self._pending is None:
            self._pending_since = now
        self._pending = (line, bar)
        taken = bar is not None and self._bars_taken
        interval = BAR_PROGRESS_INTERVAL_S if taken else BAR_LOG_INTERVAL_S
        if final or (bar is not None and bar.complete) or now - self._last_rewrite_at >= interval:
            self._flush_pending()

    def flush_if_due(self) -> None:
        """Send a kept update that has waited a full log interval (called on a timer, so a
        bar that stops moving still shows its last state)."""
        if self._pending is not None and (
                self._clock() - self._pending_since >= BAR_LOG_INTERVAL_S):
            self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending is None:
            return
        line, bar = self._pending
        self._pending = None
        self._last_rewrite_at = self._clock()
        if bar is not None and self._on_bar is not None:
            self._bars_taken = self._on_bar(bar)
            if self._bars_taken:
                return
        self._tail.append(line[:TAIL_LINE_CHARS])
        worker_log.info("[%s] %s", self.name, line)


async def forward_output(name: str, stream: asyncio.StreamReader,
                         tail: collections.deque[str], *, on_bar: BarSink | None = None) -> None:
    """Log a child's output (``[name] ...``) until the pipe closes, keeping the last lines."""
    forwarder = OutputForwarder(name, tail, on_bar=on_bar)
    try:
        while True:
            try:
                async with asyncio.timeout(BAR_LOG_INTERVAL_S):  # no extra Task per read
                    data = await stream.read(READ_CHUNK_BYTES)
            except TimeoutError:
                forwarder.flush_if_due()
                continue
            if not data:
                return
            forwarder.feed(data)
    finally:
        forwarder.close()
