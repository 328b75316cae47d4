"""The liveness check sees a manager that stopped making progress (a stuck stop or load).

The stuck states are made for real: the worker's stop is held up the way a deadlock in the
manager would hold it (its ``stop`` never returns until the test lets it), and a load whose
worker sends no progress is left running under a long ``load_timeout``; the check's slack is
shortened so the test does not wait out the real one.
"""

from __future__ import annotations

import asyncio

import pytest

from supervisor import liveness
from supervisor.lifecycle import State
from tests.helpers import wait_for
from tests.integration.conftest import ManagerFactory
from tests.integration.test_manager import server, tts


async def test_a_stop_stuck_past_its_deadlines_is_reported(
        make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "SLACK_S", 0.3)
    manager = await make_manager(server(stop_grace="0.1s", drain_timeout="0.1s") + tts("a"))
    await manager.load("a")
    assert liveness.stalls(manager) == []
    slot = manager.slots["a"]
    worker = slot.worker
    release = asyncio.Event()
    real_stop = worker.stop

    async def stuck_stop(grace_s: float) -> None:
        await release.wait()  # the "deadlock"
        await real_stop(grace_s)

    monkeypatch.setattr(worker, "stop", stuck_stop)
    unloading = asyncio.ensure_future(manager.unload("a"))
    await wait_for(lambda: bool(liveness.stalls(manager)), 10, "the stuck stop to show")
    (problem,) = liveness.stalls(manager)
    assert "model 'a' has been stopping" in problem and slot.state is State.STOPPING
    release.set()
    await asyncio.wait_for(unloading, 10)
    assert liveness.stalls(manager) == []


async def test_a_load_stuck_past_every_deadline_is_reported(
        make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "SLACK_S", 0.0)
    manager = await make_manager(
        server(load_timeout="1s", handshake_timeout="0.5s", warmup_timeout="0.5s",
               admission_timeout="0.5s") + tts("a"))
    release = asyncio.Event()

    async def stuck_start(slot: object) -> None:
        await release.wait()  # a load path that lost its deadline: the bug to detect
        raise asyncio.CancelledError

    monkeypatch.setattr(manager.starter, "start", stuck_start)
    loading = asyncio.ensure_future(manager.load("a"))
    await asyncio.sleep(0.3)
    assert liveness.stalls(manager) == []  # within its deadlines: nothing is wrong yet
    await wait_for(lambda: bool(liveness.stalls(manager)), 10, "the stuck load to show")
    (problem,) = liveness.stalls(manager)
    assert "model 'a' has been loading" in problem and "without progress" in problem
    loading.cancel()
    release.set()
    with pytest.raises(BaseException):  # noqa: B017 - cancelled on purpose
        await loading
