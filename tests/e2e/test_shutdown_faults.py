"""Fault matrix P13 (router SIGKILLed with several workers) and P15 (SIGTERM during a load),
against a real ``lemonade serve``."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.e2e.conftest import pid_gone, wait_for

CONFIG = """
[server]
stop_grace = "1s"
[models.a]
recipe = "synthetic"
type = "tts"
[models.b]
recipe = "synthetic"
type = "tts"
[models.c]
recipe = "synthetic"
type = "tts"
[models.slow]
recipe = "synthetic"
type = "tts"
[models.slow.options]
load_seconds = 3
"""


@pytest.mark.slow
def test_p13_router_sigkill_takes_every_worker_down(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    pids = [server.load(name)["pid"] for name in ("a", "b", "c")]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    started = time.monotonic()
    wait_for(lambda: all(pid_gone(p) for p in pids), 2.0, what="every worker to exit")
    assert time.monotonic() - started <= 1.0


@pytest.mark.slow
def test_p15_sigterm_during_a_load_exits_without_hanging(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    answers: list[int] = []
    client = threading.Thread(target=lambda: answers.append(server.speech("slow").status))
    client.start()
    wait_for(lambda: server.worker_pids(), 5.0, what="the slow worker to start")
    pids = server.worker_pids()
    time.sleep(0.5)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(15)
    took = time.monotonic() - started
    client.join(10)
    assert code == 0
    # The request that waited for the load is told at once that the server is going away,
    # and the load (3 s) is cut short: the exit takes about stop_grace, not the load left.
    assert answers == [503], answers
    assert took <= 1 + 1.5, took
    assert all(pid_gone(p) for p in pids)
