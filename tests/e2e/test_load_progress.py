"""Load progress you can see, and worker output that reads well, through a real server.

A real ``lemonade serve`` with slow synthetic loads: ``lemonade load`` (stdout not a TTY)
prints progress lines while it waits, status shows the phase and fraction of a loading model,
the server log has rate-limited progress lines, a tqdm-style bar a worker draws on stderr
becomes load progress instead of log lines, and worker warnings arrive once, at WARNING,
with one ``[model]`` prefix, whether the worker was spawned or forked from a zygote.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.e2e.conftest import LEMONADE_SCRIPT, Server, run_cli, server_env, wait_for

LOAD_TIMEOUT_S = 60.0  # catches hangs only; the loads below take a few seconds

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.slow]
recipe = "synthetic"
type = "tts"
[models.slow.options]
load_seconds = 4
[models.broken]
recipe = "synthetic"
type = "tts"
[models.broken.options]
load_seconds = 3
fail_load = "the weights are corrupt"
[models.bar]
recipe = "synthetic"
type = "tts"
[models.bar.options]
load_seconds = 4
progress = false
load_output = "tqdm_bar"
[models.noisy]
recipe = "synthetic"
type = "tts"
[models.noisy.options]
load_output = "warnings"
"""

_PROGRESS_LINE = re.compile(r"^loading (\S+): (.*) \((?:(\d+)%, )?.*?(\d+\.\d)s\)$")


def _load_in_background(server: Server, name: str) -> threading.Thread:
    def run() -> None:
        server.post("/api/v1/load", {"model_name": name}, timeout=LOAD_TIMEOUT_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _loading_progress(server: Server, name: str) -> dict[str, Any] | None:
    row = server.model(name)
    if row["state"] == "loading" and row["progress"] and row["progress"]["fraction"]:
        return row
    return None


def test_cli_load_prints_progress_lines_when_not_a_tty(start_server):
    server = start_server(CONFIG)
    result = run_cli("load", "slow", env={"LEMONADE_URL": server.url}, timeout=LOAD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"slow is ready \(pid \d+, loaded in \d+\.\d\ds\)", lines[-1]), lines
    progress = [_PROGRESS_LINE.match(line) for line in lines[:-1]]
    assert all(progress), lines  # nothing but progress lines before the final one
    assert len(progress) >= 2, lines  # a 4 s load polled every second
    assert {m.group(2) for m in progress if m} == {"loading synthetic model"}
    percents = [int(m.group(3)) for m in progress if m and m.group(3) is not None]
    assert percents == sorted(percents) and percents[0] < 100, lines
    assert "\r" not in result.stdout  # no bar drawn into a pipe


def test_cli_load_draws_a_bar_on_a_terminal(start_server):
    server = start_server(CONFIG)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([str(LEMONADE_SCRIPT), "load", "slow"], stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=subprocess.PIPE,
                            env=server_env({"LEMONADE_URL": server.url}))
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    data = os.read(controller, 4096)
                except OSError:  # EIO: the command exited and closed the terminal
                    break
                if not data:
                    break
                output += data
            elif proc.poll() is not None:
                break
        assert proc.wait(LOAD_TIMEOUT_S) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(controller)
        if proc.stderr is not None:
            proc.stderr.close()
    text = output.decode()
    draws = re.findall(r"\r\x1b\[Kslow \[([#.]{24})\] loading synthetic model \((\d+)%", text)
    assert len(draws) >= 2, text  # redrawn in place, every half second
    assert [int(pct) for _, pct in draws] == sorted(int(pct) for _, pct in draws)
    assert draws[-1][0].count("#") > draws[0][0].count("#") or draws[0][0].count("#") > 0
    assert "loading slow:" not in text  # no plain progress lines on a terminal
    assert re.search(r"\r\x1b\[Kslow is ready \(pid \d+", text), text  # the bar is cleared


def test_cli_load_of_a_failing_model_shows_progress_then_the_error(start_server):
    server = start_server(CONFIG)
    result = run_cli("load", "broken", env={"LEMONADE_URL": server.url},
                     timeout=LOAD_TIMEOUT_S)
    assert result.returncode == 1, result.stdout
    assert "503" in result.stderr and "the weights are corrupt" in result.stderr
    assert "loading broken: loading synthetic model" in result.stdout
    assert "is ready" not in result.stdout


def test_status_shows_phase_fraction_and_elapsed_while_loading(start_server):
    server = start_server(CONFIG)
    assert server.model("slow")["progress"] is None  # not loading: no progress
    loader = _load_in_background(server, "slow")
    row = wait_for(lambda: _loading_progress(server, "slow"), LOAD_TIMEOUT_S,
                   what="slow to report load progress")
    progress = row["progress"]
    assert progress["phase"] == "loading synthetic model"
    assert 0 < progress["fraction"] < 1
    assert progress["elapsed_s"] > 0 and progress["since_update_s"] >= 0
    assert progress["done_bytes"] is None and progress["total_bytes"] is None

    status = run_cli("status", env={"LEMONADE_URL": server.url})
    assert status.returncode == 0, status.stderr
    if "loading" in status.stdout:  # unless the load finished in between
        assert re.search(r"^slow\s+tts\s+loading \d+%", status.stdout, re.M), status.stdout
        assert re.search(r"^  loading slow: loading synthetic model \(\d+%, \d+\.\ds\)$",
                         status.stdout, re.M), status.stdout

    loader.join(LOAD_TIMEOUT_S)
    row = server.wait_state("slow", "ready")
    assert row["progress"] is None


def test_server_log_has_rate_limited_progress_lines(start_server):
    server = start_server(CONFIG)
    server.load("slow")  # 4 s, a progress report every 0.1 s: about 40 reports
    ready = re.compile(r"worker \d+ for slow ready in \d+\.\d\ds")
    wait_for(lambda: any(ready.search(line) for line in server.log_lines), 10,
             what="the ready line to reach the log")  # the log is read by another thread
    log = server.log_lines
    assert any(re.search(r"INFO\s+supervisor\.load_progress: loading slow \(kind synthetic\)$",
                         line) for line in log), server.log_text()
    progress = [line for line in log if "supervisor.load_progress: loading slow: " in line]
    assert len(progress) >= 2, server.log_text()
    assert len(progress) <= 10, progress  # at most one a second (plus phase changes)


def test_a_progress_bar_on_stderr_becomes_load_progress(start_server):
    server = start_server(CONFIG)
    loader = _load_in_background(server, "bar")
    row = wait_for(lambda: _loading_progress(server, "bar"), LOAD_TIMEOUT_S,
                   what="bar to show the progress its bar draws")
    progress = row["progress"]
    assert progress["phase"] == "synthetic weights"
    assert progress["total_bytes"] == 200_000_000
    assert 0 <= progress["done_bytes"] <= progress["total_bytes"]
    assert progress["fraction"] == pytest.approx(progress["done_bytes"] / 200_000_000, abs=0.01)
    loader.join(LOAD_TIMEOUT_S)
    server.wait_state("bar", "ready")

    text = server.log_text()
    # 51 bar updates: none is a log line of its own, and none arrives glued to another.
    assert "[bar] synthetic weights:" not in text
    assert "\\r" not in text and "\r" not in text
    lines = [line for line in server.log_lines if "loading bar: synthetic weights (" in line]
    assert 1 <= len(lines) <= 8, text
    assert re.search(r" of 190\.7 MiB, ", "\n".join(lines)), lines


@pytest.mark.parametrize("zygotes", ["lazy", "off"])
def test_worker_warnings_arrive_once_at_warning_with_one_prefix(start_server, zygotes):
    server = start_server(CONFIG, args=["--zygotes", zygotes])
    data = server.load("noisy")
    assert server.model("noisy")["info"]["worker_start"] == ("fork" if zygotes == "lazy"
                                                           else "spawn")
    expected = ("synthetic raw print", "synthetic logged warning", "synthetic library warning")
    wait_for(lambda: all(any(text in line for line in server.log_lines) for text in expected),
             10, what="the worker's output to reach the log")  # stdout and stderr both
    log = server.log_lines

    warned = [line for line in log if "synthetic library warning" in line]
    assert len(warned) == 1, warned  # warned twice from one place: shown once
    assert re.search(r" WARNING supervisor\.worker: \[noisy\] py\.warnings: \S+synthetic\.py:"
                     r"\d+: UserWarning: synthetic library warning: this option is deprecated$",
                     warned[0]), warned
    assert "warnings.warn(" not in server.log_text()  # no source line after it

    logged = [line for line in log if "synthetic logged warning" in line]
    assert len(logged) == 1 and re.search(
        r" WARNING supervisor\.worker: \[noisy\] synthetic\.library: synthetic logged warning$",
        logged[0]), logged
    raw = [line for line in log if "synthetic raw print" in line]
    assert len(raw) == 1 and re.search(r" INFO\s+supervisor\.worker: \[noisy\] synthetic raw "
                                       r"print$", raw[0]), raw
    # The worker's own INFO lines: at INFO, with the level named once.
    assert not [line for line in log if re.search(r"supervisor\.worker: \[noisy\] "
                                                  r"(INFO|WARNING|ERROR) ", line)]
    assert data["pid"]
