"""supervisor/worker_output.py: lines cut at \\n and \\r with bounded memory, levels kept, one
prefix, tqdm bars read as progress or logged at a limited rate (clock handed in)."""

from __future__ import annotations

import collections
import io
import logging
import tracemalloc

import pytest

from supervisor import worker_output
from supervisor.worker_output import (
    BAR_LOG_INTERVAL_S,
    BAR_PROGRESS_INTERVAL_S,
    MAX_LINE_BYTES,
    Bar,
    LineSplitter,
    OutputForwarder,
    parse_bar,
    parse_level,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "supervisor.worker"]


@pytest.fixture
def forwarder() -> tuple[OutputForwarder, Clock, collections.deque[str]]:
    clock = Clock()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    return OutputForwarder("m", tail, clock=clock), clock, tail


# ----------------------------------------------------------------------------- splitting


def test_lines_end_at_newline_carriage_return_and_crlf() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntwo\r\nthree\rfour") == [
        ("one", False), ("two", False), ("three", True)]
    assert splitter.close() == [("four", False)]


def test_a_crlf_split_across_reads_is_one_line_end() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"dos line\r") == [("dos line", True)]  # at once: it may be a bar
    assert splitter.feed(b"\nnext\n") == [("next", False)]  # its "\n" is no empty line
    assert splitter.feed(b"bar 1\r") == [("bar 1", True)]
    assert splitter.feed(b"bar 2") == []
    assert splitter.close() == [("bar 2", False)]


def test_a_levelled_line_split_before_its_newline_keeps_its_level(caplog, forwarder) -> None:
    fw, _, _ = forwarder
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"WARNING transformers: careful\r")
        fw.feed(b"\n")
    assert records(caplog) == [(logging.WARNING, "[m] transformers: careful")]


def test_a_line_logged_while_a_bar_is_drawn_is_split_off_the_bar(caplog) -> None:
    taken: list[Bar] = []
    fw = OutputForwarder("m", collections.deque(),
                         on_bar=lambda bar: taken.append(bar) is None, clock=Clock())
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"\r 40%|####      | 4/10 [00:01<00:01, 4it/s]WARNING x.y: mid-bar\n")
    assert [bar.fraction for bar in taken] == [0.4]
    assert records(caplog) == [(logging.WARNING, "[m] x.y: mid-bar")]


def test_a_long_line_is_cut_and_the_rest_counted() -> None:
    splitter = LineSplitter(max_bytes=10)
    (line, rewritten), = splitter.feed(b"x" * 25 + b"\nok\n")[:1]
    assert line == "x" * 10 + " ... [15 more bytes of this line dropped]"
    assert not rewritten
    assert splitter.close() == []


def test_100_mb_without_a_newline_keeps_memory_bounded() -> None:
    splitter = LineSplitter()
    chunk = b"y" * worker_output.READ_CHUNK_BYTES
    tracemalloc.start()
    try:
        for _ in range(100 * 1024 * 1024 // len(chunk)):
            assert splitter.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak  # a few buffers of 64 KiB, not 100 MB
    (line, _), = splitter.close()
    assert line.startswith("y" * MAX_LINE_BYTES + " ... [")
    assert f"[{100 * 1024 * 1024 - MAX_LINE_BYTES} more bytes" in line


def test_invalid_utf8_and_control_characters_are_made_harmless(caplog, forwarder) -> None:
    fw, _, _ = forwarder
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"bad \xff byte \x1b[31mred\x07\n")
    assert records(caplog) == [(logging.INFO, "[m] bad \ufffd byte \\x1b[31mred\\x07")]


# ----------------------------------------------------------------------------- levels


@pytest.mark.parametrize(("line", "expected"), [
    ("WARNING transformers.modeling_utils: Some weights were not used",
     (logging.WARNING, "transformers.modeling_utils", "Some weights were not used")),
    ("ERROR workers.runtime: load failed: boom", (logging.ERROR, "workers.runtime",
                                                  "load failed: boom")),
    ("DEBUG py.warnings: x", (logging.DEBUG, "py.warnings", "x")),
    ("INFO root: plain", (logging.INFO, "root", "plain")),
])
def test_levelled_lines_are_parsed(line: str, expected: tuple[int, str, str]) -> None:
    assert parse_level(line) == expected


@pytest.mark.parametrize("line", ["hello", "WARNING: no origin", "warning x: lower case",
                                  "NOTICE x: not a level", " WARNING x: indented"])
def test_other_lines_have_no_level(line: str) -> None:
    assert parse_level(line) is None


def test_each_line_is_logged_once_at_its_level_with_one_prefix(caplog, forwarder) -> None:
    fw, _, tail = forwarder
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"WARNING transformers: deprecated thing\n")
        fw.feed(b"INFO workers.runtime: loaded\n")
        fw.feed(b"a raw print\n")
    assert records(caplog) == [
        (logging.WARNING, "[m] transformers: deprecated thing"),
        (logging.INFO, "[m] workers.runtime: loaded"),
        (logging.INFO, "[m] a raw print"),
    ]
    assert list(tail)[-1] == "a raw print"


def test_a_traceback_keeps_the_level_of_its_record(caplog, forwarder) -> None:
    fw, _, _ = forwarder
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"ERROR workers.runtime: call failed\nTraceback (most recent call last):\n"
                b'  File "x.py", line 1, in <module>\nValueError: boom\n')
        fw.feed(b"later raw text\n")  # another read: not part of that record
    levels = [level for level, _ in records(caplog)]
    assert levels == [logging.ERROR] * 4 + [logging.INFO]


# ----------------------------------------------------------------------------- bars


def _tqdm_output(**kwargs: object) -> str:
    tqdm = pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = tqdm.tqdm(file=out, mininterval=0, **kwargs)
    total = kwargs["total"]
    assert isinstance(total, int)
    for _ in range(4):
        bar.update(total // 4)
    bar.close()
    return out.getvalue()


def test_real_tqdm_byte_bars_are_read() -> None:
    text = _tqdm_output(total=2_720_000_000, unit="B", unit_scale=True,
                        desc="model.safetensors")
    updates = [parse_bar(part) for part in text.replace("\n", "\r").split("\r") if part]
    assert all(updates), text
    last = updates[-1]
    assert last is not None and last.desc == "model.safetensors" and last.complete
    assert last.total_bytes == 2_720_000_000 and last.done_bytes == 2_720_000_000
    middle = updates[2]
    assert middle is not None and middle.fraction == pytest.approx(0.5, abs=0.01)
    assert middle.done_bytes == 1_360_000_000


def test_real_tqdm_counting_bars_are_read_without_bytes() -> None:
    text = _tqdm_output(total=10, desc="Loading checkpoint shards")
    bar = parse_bar(text.split("\r")[2])
    assert bar == Bar(text=bar.text if bar else "", desc="Loading checkpoint shards",
                      fraction=0.2)
    assert parse_bar(text.split("\r")[1]) == Bar(
        text=text.split("\r")[1].strip(), desc="Loading checkpoint shards", fraction=0.0)


@pytest.mark.parametrize("text", ["hello 50% done", "tokens: 5it [00:00, 95325.09it/s]",
                                  "ratio 150%|###| 1/2", ""])
def test_text_that_is_not_a_bar(text: str) -> None:
    assert parse_bar(text) is None


def _bar_bytes(step: int, steps: int = 100) -> bytes:
    percent = step * 100 // steps
    return f"\rweights: {percent:3d}%|#   | {step}/{steps} [00:01<00:01, 5it/s]".encode()


def test_bars_feed_load_progress_at_a_limited_rate_keeping_the_last(caplog) -> None:
    clock = Clock()
    taken: list[Bar] = []

    def take(bar: Bar) -> bool:
        taken.append(bar)
        return True

    fw = OutputForwarder("m", collections.deque(), on_bar=take, clock=clock)
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        for step in range(100):  # 100 updates within 1 s
            fw.feed(_bar_bytes(step))
            clock.now += 0.01
        fw.feed(_bar_bytes(100) + b"\n")  # tqdm's close: the final state, then a newline
    assert records(caplog) == []  # a bar that feeds a load's progress is no log line
    assert 3 <= len(taken) <= 1 / BAR_PROGRESS_INTERVAL_S + 2
    assert taken[0].fraction == 0.0 and taken[-1].fraction == 1.0 and taken[-1].complete
    assert all(bar.desc == "weights" for bar in taken)


def test_bars_nobody_loads_are_logged_every_few_seconds_and_at_the_end(caplog) -> None:
    clock = Clock()
    fw = OutputForwarder("m", collections.deque(), on_bar=lambda bar: False, clock=clock)
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        for step in range(100):  # 100 updates over 20 s
            fw.feed(_bar_bytes(step))
            clock.now += 0.2
        fw.feed(b"\nINFO workers.asr: transcribed\n")
    logged = [message for _, message in records(caplog)]
    bars = logged[:-1]
    assert logged[-1] == "[m] workers.asr: transcribed"
    assert 20 / BAR_LOG_INTERVAL_S <= len(bars) <= 20 / BAR_LOG_INTERVAL_S + 2, logged
    assert bars[0].startswith("[m] weights:   0%|")
    assert bars[-1].startswith("[m] weights:  99%|")  # the newest update, kept for this line


def test_a_kept_update_is_logged_when_the_output_goes_quiet(caplog, forwarder) -> None:
    fw, clock, _ = forwarder
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"\rDownloading 1 MB\rDownloading 2 MB\rDownloading 3 MB\r")
        fw.flush_if_due()
        clock.now += BAR_LOG_INTERVAL_S
        fw.flush_if_due()
    assert [m for _, m in records(caplog)] == ["[m] Downloading 1 MB", "[m] Downloading 3 MB"]
    fw.close()
    assert len(records(caplog)) == 2  # nothing left over


def test_close_flushes_what_is_left(caplog, forwarder) -> None:
    fw, _, tail = forwarder
    with caplog.at_level(logging.DEBUG, "supervisor.worker"):
        fw.feed(b"\r 10%|#   | 1/10\r 20%|##  | 2/10")
        fw.close()
    assert [m for _, m in records(caplog)] == ["[m] 10%|#   | 1/10", "[m] 20%|##  | 2/10"]
    assert list(tail) == ["10%|#   | 1/10", "20%|##  | 2/10"]
