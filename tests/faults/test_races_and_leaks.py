"""Fault matrix, race rows (C4-C6, C9, C12) and leak rows (L1, L4, L5)."""

from __future__ import annotations

import asyncio
import os
import time
from unittest import mock

import pytest

from supervisor.lifecycle import State
from tests.conftest import soak_size
from tests.faults.conftest import HarnessFactory, wait_until
from tests.helpers import process_gone


async def test_c4_request_arriving_as_the_idle_timer_fires_is_served(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {}}, server={"auto_unload_timer": "0.15s"})
    for i in range(soak_size(6, 200)):
        await h.speak("m")
        # Land the next request right around the timer's due time.
        await asyncio.sleep(0.13 + (i % 5) * 0.01)
        out = await h.speak("m")
        assert out.status == 200, out.error  # rescued, or loaded again: never an error
    assert h.manager.audit() == []


async def test_c5_timer_manual_unload_and_eviction_at_once_stop_once(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {}})
    await h.manager.load("m")
    slot = h.manager.slots["m"]
    unloaded: list[dict[str, object]] = []
    h.manager.events.listen(lambda e: unloaded.append(e) if e["event"] == "unloaded" else None)
    pid = slot.pid
    # All three in one loop tick: the timer's callback, a manual unload, an LRU retire.
    h.manager.idle_expired("m", slot.timer.generation)
    results = await asyncio.gather(h.manager.unload("m"), h.manager.retire(slot, "lru"),
                                   return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]
    await wait_until(lambda: slot.state is State.UNLOADED and not h.manager._tasks_running(),
                     2.0, "quiescence")
    assert len(unloaded) == 1, unloaded
    assert pid is not None and process_gone(pid)
    assert not slot.timer.armed


async def test_c6_stale_timer_of_a_previous_incarnation_is_harmless(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {}}, server={"auto_unload_timer": "0.4s"})
    await h.manager.load("m")
    slot = h.manager.slots["m"]
    stale = slot.timer.generation
    await h.manager.unload("m")
    await h.manager.load("m")
    pid = slot.pid
    h.manager.idle_expired("m", stale)  # the old incarnation's timer fires late
    await asyncio.sleep(0.1)
    assert slot.state is State.READY and slot.pid == pid  # not unloaded early


async def test_c9_c12_budget_ledger_through_an_eviction_whose_load_fails(
    harness: HarnessFactory,
) -> None:
    h = await harness({"a": {}, "b": {"fault": "crash_on_load"}},
                      server={"memory_budget": "100MiB"},
                      recipe_keys={"a": {"memory": "60MiB"}, "b": {"memory": "60MiB"}})
    await h.manager.load("a")
    assert h.manager.slots["a"].reserved_bytes == 60 * 2**20
    out = await h.speak("b")  # evicts a, then crashes while loading
    assert out.status == 503
    for slot in h.manager.slots.values():
        assert slot.reserved_bytes == 0 and not slot.admitted, slot.name
    assert h.manager.slots["a"].state is State.UNLOADED  # no resurrection, no double count
    assert h.manager.audit() == []


@pytest.mark.slow
async def test_l1_spawn_call_stop_cycles_leak_nothing(harness: HarnessFactory) -> None:
    h = await harness({"m": {}})
    # One cycle first: it starts the kind's zygote, whose socket and pipes stay open for the
    # server's life (3 descriptors). What must not grow is the count per cycle.
    assert (await h.speak("m")).status == 200
    await h.manager.unload("m")
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(soak_size(25, 1000)):
        out = await h.speak("m")
        assert out.status == 200
        await h.manager.unload("m")
    assert len(os.listdir("/proc/self/fd")) == fds
    assert h.manager.runtime_dir is not None
    assert [p.name for p in h.manager.runtime_dir.iterdir()] == ["owner"]
    assert all(process_gone(pid) for pid in h.pids)


async def test_l4_reservation_returns_to_zero_when_the_process_exits(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"memory_mb": 8}}, recipe_keys={"m": {"memory": "64MiB"}})
    await h.manager.load("m")
    slot = h.manager.slots["m"]
    assert slot.reserved_bytes > 0 and slot.rss_bytes > 8 * 2**20
    os.kill(slot.pid, 9)
    await wait_until(lambda: slot.state is State.UNLOADED, 2.0, "unload after the crash")
    assert slot.reserved_bytes == 0 and slot.rss_bytes == 0


async def test_l5_wall_clock_jumps_do_not_fire_idle_timers(harness: HarnessFactory) -> None:
    h = await harness({"m": {}}, server={"auto_unload_timer": "0.5s"})
    await h.manager.load("m")
    real = time.time
    with mock.patch("time.time", lambda: real() + 3600):
        await asyncio.sleep(0.2)
        assert h.manager.slots["m"].state is State.READY
    with mock.patch("time.time", lambda: real() - 3600):
        await asyncio.sleep(0.1)
        assert h.manager.slots["m"].state is State.READY
    await wait_until(lambda: h.manager.slots["m"].state is State.UNLOADED, 2.0, "idle unload")
