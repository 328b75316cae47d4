"""supervisor/load_progress.py: when a load's progress is worth a log line (fake clock), what
status and the CLI show of it, and the board's life with a real load task."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from supervisor.cli_progress import bar_line, loading_lines, state_cell
from supervisor.events import EventBus
from supervisor.load_progress import (
    LOG_EVERY_S,
    MIN_LOG_GAP_S,
    QUIET_LOG_S,
    LoadProgress,
    ProgressBoard,
    summarize,
)


def test_the_first_report_and_each_phase_change_are_logged() -> None:
    p = LoadProgress(started=0.0)
    assert p.update(0.5, 0.02, "importing torch")
    assert not p.update(0.6, 0.03, "importing torch")  # same phase, hardly moved
    assert p.update(2.0, 0.2, "reading weights")
    assert not p.update(2.5, 0.9, "building")  # a phase change within MIN_LOG_GAP_S: later
    assert p.update(2.0 + MIN_LOG_GAP_S, 0.9, "building")
    assert p.phase == "building" and p.fraction == 0.9 and p.reports == 5


def test_a_steady_phase_is_logged_every_ten_percent_or_every_few_seconds() -> None:
    p = LoadProgress(started=0.0)
    logged = [t for t in range(200) if p.update(t * 0.1, t / 200, "downloading")]
    times = [t * 0.1 for t in logged]
    # 0 -> 1 over 20 s: every 10 % is every 2 s, sooner than LOG_EVERY_S
    assert 9 <= len(times) <= 11, times
    assert all(b - a >= MIN_LOG_GAP_S for a, b in itertools.pairwise(times))

    slow = LoadProgress(started=0.0)
    logged = [t for t in range(600) if slow.update(t * 0.1, t / 60000, "downloading")]
    gaps = [(b - a) * 0.1 for a, b in itertools.pairwise(logged)]
    assert gaps and all(gap == pytest.approx(LOG_EVERY_S, abs=0.11) for gap in gaps), gaps


def test_a_quiet_load_gets_a_still_loading_line() -> None:
    p = LoadProgress(started=10.0)
    assert not p.quiet_due(10.0 + QUIET_LOG_S - 1)
    assert p.quiet_due(10.0 + QUIET_LOG_S)
    assert not p.quiet_due(10.0 + QUIET_LOG_S + 1)  # it counts as logged
    p.update(30.0, None, "converting")  # a report (logged) starts the quiet window again
    assert not p.quiet_due(30.0 + QUIET_LOG_S - 1)
    assert p.quiet_due(30.0 + QUIET_LOG_S)


def test_describe_and_summary() -> None:
    p = LoadProgress(started=100.0)
    assert p.describe(100.0)["phase"] == "starting the worker"
    p.update(103.0, 0.4567, "  syncing\nthe copy  ", done_bytes=3 * 2**20, total_bytes=2**30)
    assert p.describe(105.0) == {
        "phase": "syncing the copy", "fraction": 0.4567, "elapsed_s": 5.0,
        "since_update_s": 2.0, "done_bytes": 3 * 2**20, "total_bytes": 2**30,
    }
    assert p.summary(105.0) == "syncing the copy (46%, 3.0 MiB of 1.0 GiB, 5.0s)"
    p.update(106.0, None, "allocating", done_bytes=512)
    assert p.summary(106.0) == "allocating (512 B, 6.0s)"
    p.update(107.0, None, "")  # no phase, no fraction: the phase and fraction stay
    assert p.phase == "allocating"


def test_status_cells_and_the_cli_bar() -> None:
    progress = {"phase": "reading", "fraction": 0.5, "elapsed_s": 2.0, "done_bytes": None,
                "total_bytes": None}
    row = {"name": "m", "state": "loading", "in_flight": 0, "progress": progress}
    assert state_cell(row) == "loading 50%"
    assert state_cell({"state": "ready", "in_flight": 2, "progress": None}) == "ready (2 busy)"
    assert loading_lines([row, {"name": "other", "progress": None}]) == [
        "m: reading (50%, 2.0s)"]
    assert bar_line("m", progress, 200) == "m [############............] reading (50%, 2.0s)"
    assert len(bar_line("m", progress, 30)) == 29  # never wider than the terminal
    unknown = dict(progress, fraction=None)
    assert "[????" in bar_line("m", unknown, 200)
    assert summarize(unknown) == "reading (2.0s)"


async def test_the_board_keeps_a_load_only_while_its_task_runs(caplog) -> None:
    events = EventBus()
    board = ProgressBoard(events)
    release = asyncio.Event()
    task = asyncio.create_task(release.wait())
    with caplog.at_level(logging.INFO, "supervisor.load_progress"):
        board.begin("m", "synthetic", task)
        assert board.report("m", 0.5, "reading", done_bytes=1, total_bytes=2)
        assert not board.report("other", 0.5, "reading")
        progress = board.get("m")
        assert progress is not None and progress.fraction == 0.5
        release.set()
        await task
        await asyncio.sleep(0)  # done callbacks run on the next turn
    assert board.get("m") is None
    assert not board.report("m", 0.9, "late")  # after the load: not load progress
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "loading m (kind synthetic)"
    assert messages[1].startswith("loading m: reading (50%, 1 B of 2 B, ")
    assert events.published == 1
