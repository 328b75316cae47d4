"""Workers forked from a zygote keep every guarantee a spawned worker has.

Real processes throughout: a real Manager, real zygotes (``python -m workers.zygote``) and
real forked synthetic workers. What a user relies on: a forked worker serves like a spawned
one, sits in its own process group, dies with its parent, is reaped with a true exit status,
unloading it ends its process, the zygote never grows with the models, a dead zygote is
replaced, and when forking is impossible the worker is spawned and the log says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import psutil
import pytest

from supervisor import process
from supervisor.lifecycle import State
from tests.helpers import process_gone, wait_for
from tests.integration.conftest import ManagerFactory
from tests.integration.test_manager import server, speak, tts

MiB = 1024 * 1024


def _zygote(manager) -> dict:
    (row,) = manager.zygotes.describe()
    return row


def _zygote_pids(manager) -> list[int]:
    return [row["pid"] for row in manager.zygotes.describe() if row["pid"] is not None]


async def test_a_forked_worker_serves_in_its_own_session_and_unloading_ends_it(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("a"))
    pid, audio = await speak(manager, "a")
    assert audio[:4] == b"RIFF"
    slot = manager.slots["a"]
    assert slot.pid == pid and slot.info["worker_start"] == "fork"
    zygote = _zygote(manager)
    worker = psutil.Process(pid)
    assert worker.ppid() == zygote["pid"], "a forked worker's parent is its zygote"
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid, "own session and process group"
    assert zygote["forks"] == 1 and zygote["state"] == "ready"
    await manager.unload("a")
    assert process_gone(pid), "unloading must end the worker process"
    assert psutil.pid_exists(zygote["pid"]), "the zygote outlives the workers it forks"


async def test_reloads_fork_from_the_same_zygote(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("a") + tts("b"))
    pids = set()
    for _ in range(3):
        await asyncio.gather(manager.load("a"), manager.load("b"))
        pids |= {manager.slots["a"].pid, manager.slots["b"].pid}
        await asyncio.gather(manager.unload("a"), manager.unload("b"))
    assert len(pids) == 6, "every load is a fresh process"
    zygote = _zygote(manager)  # one zygote per kind, shared by both models
    assert zygote["forks"] == 6
    assert all(process_gone(pid) for pid in pids)


async def test_off_spawns_workers_as_children_of_the_supervisor(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="off") + tts("a"))
    await manager.load("a")
    slot = manager.slots["a"]
    assert slot.info["worker_start"] == "spawn"
    assert psutil.Process(slot.pid).ppid() == os.getpid()
    assert manager.zygotes.describe() == []


async def test_eager_starts_the_zygote_of_each_configured_kind_before_any_load(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="eager") + tts("a") + tts("b"))
    await wait_for(lambda: manager.zygotes.describe() != [], 30, "the eager zygote")
    assert all(s.state is State.UNLOADED for s in manager.slots.values())
    assert _zygote(manager)["forks"] == 0


async def test_the_zygote_never_holds_what_its_workers_load(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("big", options={"memory_mb": 300}))
    await manager.load("big")
    worker_rss = psutil.Process(manager.slots["big"].pid).memory_info().rss
    zygote_rss = _zygote(manager)["rss_bytes"]
    assert worker_rss > 300 * MiB
    assert zygote_rss < 100 * MiB, f"zygote holds {zygote_rss / MiB:.0f} MiB"


async def test_a_killed_forked_worker_is_reaped_with_its_signal_and_reloaded(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("a"))
    await manager.load("a")
    slot = manager.slots["a"]
    worker = slot.worker
    os.kill(slot.pid, signal.SIGKILL)
    await asyncio.wait_for(asyncio.shield(worker.exited), 10)
    assert worker.describe_exit() == "killed by SIGKILL", "the zygote reports the real status"
    await wait_for(lambda: slot.state is State.UNLOADED and slot.restarts == 1, 10,
                   "the crash to be noticed")
    pid, audio = await speak(manager, "a")
    assert audio and pid == slot.pid and slot.info["worker_start"] == "fork"


async def test_a_dead_zygote_takes_its_workers_and_is_replaced(
    make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("a"))
    await manager.load("a")
    slot = manager.slots["a"]
    old_worker, old_zygote = slot.pid, _zygote(manager)["pid"]
    with caplog.at_level(logging.WARNING, logger="supervisor.zygote"):
        os.kill(old_zygote, signal.SIGKILL)
        # Its workers die with it (parent-death signal): none may be left without a parent.
        await wait_for(lambda: process_gone(old_worker), 10, "the worker to die with its zygote")
        await wait_for(lambda: slot.state is State.UNLOADED, 10, "the crash to be noticed")
    assert any("zygote" in r.getMessage() for r in caplog.records)
    pid, audio = await speak(manager, "a")
    assert audio and pid == slot.pid
    new_zygote = _zygote(manager)
    assert new_zygote["pid"] not in (None, old_zygote)
    assert psutil.Process(slot.pid).ppid() == new_zygote["pid"]


async def test_eager_replaces_a_dead_zygote_without_waiting_for_a_load(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="eager") + tts("a"))
    await wait_for(lambda: manager.zygotes.describe() != [], 30, "the eager zygote")
    first = _zygote(manager)["pid"]
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: _zygote_pids(manager) not in ([], [first]), 30,
                   "a new zygote to replace the dead one")
    assert all(s.state is State.UNLOADED for s in manager.slots.values())
    pid, audio = await speak(manager, "a")
    assert audio and psutil.Process(pid).ppid() == _zygote(manager)["pid"]


async def test_a_zygote_that_cannot_start_means_a_spawn_and_a_log_line(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = process._create_worker_process

    async def no_zygotes(*args, **kwargs):
        if "workers.zygote" in args:
            raise OSError(12, "Cannot allocate memory")
        return await real(*args, **kwargs)

    monkeypatch.setattr(process, "_create_worker_process", no_zygotes)
    manager = await make_manager(server(zygotes="lazy") + tts("a"))
    with caplog.at_level(logging.WARNING, logger="supervisor.zygote"):
        for _ in range(4):
            _, audio = await speak(manager, "a")
            assert audio
            assert manager.slots["a"].info["worker_start"] == "spawn"
            await manager.unload("a")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("did not start" in m for m in messages) == 3, messages
    assert any("every later one of this kind" in m for m in messages)


async def test_closing_the_manager_ends_zygotes_and_workers(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("a"))
    await manager.load("a")
    pids = [manager.slots["a"].pid, _zygote(manager)["pid"]]
    await manager.close()
    assert all(process_gone(pid) for pid in pids)
    assert manager.zygotes.describe() == []


async def test_a_forked_worker_is_charged_what_its_exit_frees_and_the_zygote_once(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="lazy", memory_budget="8GiB")
                                 + tts("big", options={"memory_mb": 300}))
    await manager.load("big")
    slot = manager.slots["big"]
    # RSS counts the pages shared with the zygote; they stay behind when the worker exits.
    assert 300 * MiB < slot.cost_bytes() < slot.rss_bytes
    zygote_rss = _zygote(manager)["rss_bytes"]
    assert zygote_rss > 0
    budget = manager.budget_for_models()
    assert budget is not None
    assert abs(budget - (8 * 1024 * MiB - zygote_rss)) < 16 * MiB  # it may grow a little


# ----------------------------------------------------------------------------- idle exit


def _stopped_events(manager) -> list[dict]:
    events: list[dict] = []
    manager.events.listen(lambda e: events.append(e) if e["event"] == "zygote_stopped" else None)
    return events


async def test_an_idle_zygote_ends_and_the_next_load_starts_a_new_one(
    make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    manager = await make_manager(server(zygotes="lazy", zygote_idle_timeout="0.5s") + tts("a"))
    stopped = _stopped_events(manager)
    await manager.load("a")
    first = _zygote(manager)
    assert first["workers"] == 1 and first["idle_expires_in_s"] is None
    with caplog.at_level(logging.INFO, logger="supervisor.zygote_pool"):
        await manager.unload("a")
        # The timer runs from the last worker's exit.
        assert 0 < (_zygote(manager)["idle_expires_in_s"] or 0) <= 0.5
        assert _zygote(manager)["workers"] == 0
        await wait_for(lambda: process_gone(first["pid"]), 30, "the idle zygote to end")
    assert manager.zygotes.describe() == []
    (event,) = stopped
    assert event["kind"] == "synthetic" and event["pid"] == first["pid"]
    assert event["reason"] == "idle" and event["idle_seconds"] >= 0.5
    assert event["freed_bytes"] > 0 and event["model"] is None
    (line,) = [r for r in caplog.records if "had no worker" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert str(first["pid"]) in line.getMessage() and "synthetic" in line.getMessage()
    assert "frees about" in line.getMessage()

    pid, audio = await speak(manager, "a")
    assert audio[:4] == b"RIFF" and manager.slots["a"].info["worker_start"] == "fork"
    second = _zygote(manager)
    assert second["pid"] not in (None, first["pid"])
    assert psutil.Process(pid).ppid() == second["pid"]


async def test_the_budget_stops_counting_a_zygote_once_it_ended(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="lazy", memory_budget="8GiB",
                                        zygote_idle_timeout="0.5s") + tts("a"))
    await manager.load("a")
    zygote = _zygote(manager)["pid"]
    assert manager.zygotes.held_bytes() > 0
    assert manager.budget_for_models() < 8 * 1024 * MiB
    await manager.unload("a")
    await wait_for(lambda: process_gone(zygote), 30, "the idle zygote to end")
    assert manager.zygotes.held_bytes() == 0
    assert manager.budget_for_models() == 8 * 1024 * MiB


async def test_a_live_worker_keeps_its_zygote_and_a_fork_cancels_a_pending_exit(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server(zygotes="lazy", zygote_idle_timeout="2s") + tts("a"))
    await manager.load("a")
    zygote = _zygote(manager)["pid"]
    await asyncio.sleep(3)  # well past the timeout, with a worker alive the whole time
    row = _zygote(manager)
    assert row["pid"] == zygote and row["workers"] == 1 and row["idle_expires_in_s"] is None

    await manager.unload("a")
    assert _zygote(manager)["idle_expires_in_s"] is not None  # the exit is due in <= 2 s
    await manager.load("a")  # its fork request cancels it
    row = _zygote(manager)
    assert row["pid"] == zygote and row["workers"] == 1 and row["idle_expires_in_s"] is None
    await asyncio.sleep(2.5)  # past the deadline the cancelled timer had
    assert _zygote(manager)["pid"] == zygote and not process_gone(zygote)
    assert psutil.Process(manager.slots["a"].pid).ppid() == zygote


async def test_a_zygote_idle_timeout_of_0_means_never(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(zygotes="lazy", zygote_idle_timeout=0) + tts("a"))
    await manager.load("a")
    await manager.unload("a")
    row = _zygote(manager)
    assert row["workers"] == 0 and row["idle_expires_in_s"] is None
    assert not process_gone(row["pid"])


async def test_eager_does_not_restart_a_zygote_that_ended_for_idleness(
    make_manager: ManagerFactory,
) -> None:
    from supervisor.zygote_pool import RESTART_DELAY_S

    manager = await make_manager(server(zygotes="eager", zygote_idle_timeout="0.5s") + tts("a"))
    stopped = _stopped_events(manager)
    # Ready with no worker, so its timer starts at once.
    await wait_for(lambda: stopped != [], 30, "the eager zygote to end for idleness")
    first = stopped[0]["pid"]
    await wait_for(lambda: process_gone(first), 30, "the idle zygote's process to end")
    await asyncio.sleep(RESTART_DELAY_S * 3)  # an eager restart would have come by now
    assert manager.zygotes.describe() == [] and len(stopped) == 1
    pid, audio = await speak(manager, "a")  # the next load starts one, as in lazy mode
    assert audio and manager.slots["a"].info["worker_start"] == "fork"
    assert psutil.Process(pid).ppid() == _zygote(manager)["pid"] != first
