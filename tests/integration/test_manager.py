"""The manager with real synthetic workers: idle timers, single-flight loads, every eviction
path, crash detection, load failures. Each test names the behaviour a user relies on."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from supervisor.errors import (
    Conflict,
    GatewayTimeout,
    LemonadeError,
    ServiceUnavailable,
    WorkerFailed,
)
from supervisor.lifecycle import State
from supervisor.manager import Manager
from supervisor.status import model_rows
from tests.helpers import process_gone, wait_for
from tests.integration.conftest import ManagerFactory

MiB = 1024 * 1024


def tts(name: str, **fields: Any) -> str:
    """A [models.NAME] table for the synthetic tts kind; ``options`` go in their own table."""
    options = fields.pop("options", {})
    kind_type = fields.pop("type", "tts")
    lines = [f"[models.{name}]", 'recipe = "synthetic"', f'type = "{kind_type}"']
    lines += [f"{k} = {_toml(v)}" for k, v in fields.items()]
    lines.append(f"[models.{name}.options]")
    lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def server(**fields: Any) -> str:
    fields.setdefault("auto_unload_timer", "never")
    fields.setdefault("stop_grace", "2s")
    return "[server]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items())


async def speak(manager: Manager, name: str, *, keep_alive_s: float | None = None,
                text: str = "hello") -> tuple[int, bytes]:
    async with manager.use(name, keep_alive_s=keep_alive_s) as lease:
        async with lease.channel.call("speech", {"input": text, "response_format": "wav"},
                                      timeout_s=30) as call:
            audio = b"".join(await call.collect())
        return lease.pid, audio


def assert_retired(manager: Manager, name: str, pid: int, reason: str) -> None:
    slot = manager.slots[name]
    assert slot.state is State.UNLOADED, slot.state
    assert slot.last_eviction is not None and slot.last_eviction["reason"] == reason
    assert not slot.timer.armed, "idle timer left armed after eviction"
    assert slot.timer.expires_at is None
    assert process_gone(pid), f"worker {pid} of {name} still exists after {reason}"


# ----------------------------------------------------------------------------- idle timers


async def test_idle_unload_after_recipe_timeout(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server() + tts("a", idle_timeout="0.5s"))
    pid, audio = await speak(manager, "a")
    assert audio.startswith(b"RIFF")
    slot = manager.slots["a"]
    assert slot.timer.armed and manager.effective_idle_timeout(slot).source.startswith("recipe")
    took = await wait_for(lambda: slot.state is State.UNLOADED, 5, "idle unload")
    assert 0.3 < took < 2.0
    assert_retired(manager, "a", pid, "idle")


async def test_recipe_without_timeout_uses_global_env_var(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        "[server]\nstop_grace = \"2s\"\n" + tts("a"),
        env={"LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER": "0.5s"},
    )
    slot = manager.slots["a"]
    effective = manager.effective_idle_timeout(slot)
    assert effective.seconds == 0.5
    assert "LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER" in effective.source
    pid, _ = await speak(manager, "a")
    await wait_for(lambda: slot.state is State.UNLOADED, 5, "idle unload via the global timer")
    assert_retired(manager, "a", pid, "idle")


async def test_idle_timeout_zero_never_unloads(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(auto_unload_timer="0.3s") + tts("a", idle_timeout=0))
    pid, _ = await speak(manager, "a")
    slot = manager.slots["a"]
    assert not slot.timer.armed
    await asyncio.sleep(1.0)
    assert slot.state is State.READY and slot.pid == pid
    assert model_rows(manager)[0]["expires_at"] is None


async def test_timer_counts_from_the_end_of_the_last_request(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server() + tts("a", idle_timeout="0.6s", options={"latency_ms": 1000, "chunks": 2})
    )
    await manager.load("a")
    slot = manager.slots["a"]
    await speak(manager, "a")  # takes ~1 s, longer than the idle timeout
    ended = time.monotonic()
    await asyncio.sleep(0.3)
    assert slot.state is State.READY, "unloaded before the timeout counted from the request end"
    await wait_for(lambda: slot.state is State.UNLOADED, 3, "idle unload")
    assert time.monotonic() - ended >= 0.55


async def test_request_in_flight_is_never_unloaded_by_its_timer(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(
        server() + tts("a", idle_timeout="0.2s", options={"latency_ms": 1500, "chunks": 3})
    )
    await manager.load("a")
    slot = manager.slots["a"]
    request = asyncio.create_task(speak(manager, "a"))
    await wait_for(lambda: slot.in_flight == 1, 2, "the request to start")
    await asyncio.sleep(0.8)  # four idle timeouts later
    assert slot.state is State.READY and not slot.timer.armed
    pid, audio = await request
    assert audio.startswith(b"RIFF") and slot.pid == pid
    await wait_for(lambda: slot.state is State.UNLOADED, 3, "idle unload after the request")


async def test_keep_alive_on_a_request_overrides_and_holds(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server() + tts("a", idle_timeout="1h"))
    await speak(manager, "a", keep_alive_s=0.4)
    slot = manager.slots["a"]
    assert manager.effective_idle_timeout(slot).source == "request"
    await speak(manager, "a")  # no keep_alive: the last one still holds
    assert manager.effective_idle_timeout(slot).seconds == 0.4
    await wait_for(lambda: slot.state is State.UNLOADED, 3, "unload after keep_alive")
    assert slot.last_eviction is not None and slot.last_eviction["reason"] == "idle"


async def test_runtime_timeout_rearms_an_idle_model(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server() + tts("a", idle_timeout="1h"))
    await manager.load("a")
    manager.set_idle_timeout("a", 0.3)
    slot = manager.slots["a"]
    assert manager.effective_idle_timeout(slot).source == "runtime"
    await wait_for(lambda: slot.state is State.UNLOADED, 3, "unload after the runtime timeout")


# ----------------------------------------------------------------------------- every eviction


async def test_every_eviction_path_cancels_the_timer_and_ends_the_process(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(
        server(max_loaded_models=2, memory_budget="400MiB")
        + "[groups.npu]\nexclusive = true\n"
        + tts("idle", idle_timeout="0.3s")
        + tts("lru1", idle_timeout="1h")
        + tts("lru2", idle_timeout="1h")
        + tts("big", idle_timeout="1h", memory="300MiB", options={"memory_mb": 8})
        + tts("npu1", idle_timeout="1h", group="npu")
        + tts("npu2", idle_timeout="1h", group="npu")
        + tts("plain", idle_timeout="1h")
        + tts("crashy", idle_timeout="1h")
    )
    slots = manager.slots

    # idle
    pid, _ = await speak(manager, "idle")
    await wait_for(lambda: slots["idle"].state is State.UNLOADED, 3, "idle unload")
    assert_retired(manager, "idle", pid, "idle")

    # lru: a third model past max_loaded_models=2 evicts the least recently used
    pid1, _ = await speak(manager, "lru1")
    await speak(manager, "lru2")
    assert slots["lru1"].timer.armed
    await speak(manager, "plain")
    assert_retired(manager, "lru1", pid1, "lru")
    await manager.unload_all()

    # memory: 'big' is estimated at 300 MiB (until measured); with a 400 MiB budget,
    # another 300 MiB estimate cannot sit beside it
    pid_big, _ = await speak(manager, "big")
    manager.slots["big"].measured_cost_bytes = 300 * MiB  # keep the estimate for the test
    manager.slots["lru2"].measured_cost_bytes = 300 * MiB
    await speak(manager, "lru2")
    assert_retired(manager, "big", pid_big, "memory")
    await manager.unload_all()

    # exclusive group: npu2 evicts npu1 though there is room
    pid_npu, _ = await speak(manager, "npu1")
    await speak(manager, "npu2")
    assert_retired(manager, "npu1", pid_npu, "exclusive")

    # manual
    pid_plain, _ = await speak(manager, "plain")
    await manager.unload("plain")
    assert_retired(manager, "plain", pid_plain, "manual")

    # unload all
    pid_npu2 = slots["npu2"].pid
    assert pid_npu2 is not None
    await manager.unload_all()
    assert_retired(manager, "npu2", pid_npu2, "unload_all")

    # keep_alive 0
    pid, _ = await speak(manager, "plain", keep_alive_s=0)
    await wait_for(lambda: slots["plain"].state is State.UNLOADED, 3, "keep_alive 0 unload")
    assert_retired(manager, "plain", pid, "keep_alive_0")

    # crash: SIGKILL while idle is noticed at once
    pid, _ = await speak(manager, "crashy")
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: slots["crashy"].state is State.UNLOADED, 3, "crash detection")
    assert_retired(manager, "crashy", pid, "crash")
    assert slots["crashy"].restarts == 1
    new_pid, _ = await speak(manager, "crashy")
    assert new_pid != pid


# ----------------------------------------------------------------------------- loads


async def test_twenty_concurrent_cold_requests_cause_one_spawn(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server() + tts("a", options={"load_seconds": 0.5}))
    results = await asyncio.gather(*(speak(manager, "a") for _ in range(20)))
    assert manager.spawns == 1
    assert len({pid for pid, _ in results}) == 1
    assert all(audio.startswith(b"RIFF") for _, audio in results)


async def test_crash_mid_request_is_a_502_and_the_next_request_reloads(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(
        server() + tts("a", options={"latency_ms": 3000, "chunks": 2})
    )
    await manager.load("a")
    pid = manager.slots["a"].pid
    assert pid is not None
    request = asyncio.create_task(speak(manager, "a"))
    await wait_for(lambda: manager.slots["a"].in_flight == 1, 2, "the request to start")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerFailed) as caught:
        await request
    assert caught.value.status == 502 and "'a'" in caught.value.message
    await wait_for(lambda: manager.slots["a"].state is State.UNLOADED, 3, "crash handling")
    assert manager.slots["a"].in_flight == 0
    new_pid, _ = await asyncio.wait_for(
        speak(manager, "a"), 10
    )
    assert new_pid != pid


async def test_busy_victim_is_drained_not_cut_off(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server(max_loaded_models=1)
        + tts("slow", options={"latency_ms": 1200, "chunks": 3}) + tts("b")
    )
    await manager.load("slow")
    request = asyncio.create_task(speak(manager, "slow"))
    await wait_for(lambda: manager.slots["slow"].in_flight == 1, 2, "the request to start")
    await speak(manager, "b")  # needs slow's place: waits for the drain
    _, audio = await request
    assert audio.startswith(b"RIFF"), "the drained request was cut off"
    assert manager.slots["slow"].last_eviction == {
        "reason": "lru", "at": manager.slots["slow"].last_eviction["at"]}


async def test_load_failure_evicts_idle_models_retries_once_then_cools_down(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(
        server(load_failure_cooldown="1s", load_failure_cooldown_max="4s")
        + tts("ok") + tts("broken", options={"fail_load": "weights are corrupt"})
    )
    await manager.load("ok")
    spawns = manager.spawns
    with pytest.raises(ServiceUnavailable) as caught:
        await speak(manager, "broken")
    assert "weights are corrupt" in caught.value.message
    assert caught.value.retry_after_header() == "1"
    assert manager.spawns == spawns + 2, "expected exactly one retry"
    assert manager.slots["ok"].last_eviction["reason"] == "load_failure_evict_all"
    assert manager.slots["broken"].state is State.FAILED
    with pytest.raises(ServiceUnavailable, match="next attempt allowed"):
        await speak(manager, "broken")
    assert manager.spawns == spawns + 2, "a request during the cooldown spawned a worker"
    await asyncio.sleep(1.1)
    with pytest.raises(ServiceUnavailable) as caught:
        await speak(manager, "broken")
    assert caught.value.retry_after_header() == "2", "the cooldown should double"


async def test_bad_config_fails_without_evicting_others(make_manager: ManagerFactory) -> None:
    # A typo in the options fails the config load now (tests/e2e/test_startup_errors.py);
    # this mistake only the worker can see: the synthetic kind serves no llm.
    manager = await make_manager(
        server() + tts("ok") + tts("typo", type="llm")
    )
    await manager.load("ok")
    with pytest.raises(ServiceUnavailable, match="serves only 'tts'"):
        await manager.load("typo")
    assert manager.slots["ok"].state is State.READY


async def test_preload_and_pinned_models(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server(max_loaded_models=1) + tts("pinned", preload=True, pinned=True) + tts("b")
    )
    await wait_for(lambda: manager.slots["pinned"].state is State.READY, 5, "preload")
    with pytest.raises(Conflict, match="'pinned'"):
        await speak(manager, "b")
    assert manager.slots["b"].state is State.UNLOADED
    assert manager.slots["pinned"].state is State.READY


async def test_memory_budget_respects_priorities(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server(memory_budget="100MiB")
        + tts("asr_like", priority=2, memory="60MiB")
        + tts("tts_low", priority=1, memory="60MiB")
    )
    await manager.load("asr_like")
    manager.slots["asr_like"].measured_cost_bytes = 60 * MiB
    with pytest.raises(Conflict) as caught:
        await manager.load("tts_low")
    assert "'asr_like'" in caught.value.message and "priority" in caught.value.message
    assert manager.slots["asr_like"].state is State.READY


async def test_concurrent_loads_share_the_budget(make_manager: ManagerFactory) -> None:
    """Two cold requests for different models cannot both fit into the same room: the second
    load counts the first one's reservation, so the two are never resident together."""
    manager = await make_manager(
        server(memory_budget="120MiB", max_parallel_loads=2)
        + tts("a", memory="70MiB", options={"load_seconds": 0.3, "memory_mb": 64})
        + tts("b", memory="70MiB", options={"load_seconds": 0.3, "memory_mb": 64})
    )
    resident: set[str] = set()
    most_at_once = 0

    def track(event: dict[str, Any]) -> None:
        nonlocal most_at_once
        if event["event"] == "spawned":
            resident.add(event["model"])
        elif event["event"] == "unloaded":
            resident.discard(event["model"])
        most_at_once = max(most_at_once, len(resident))

    manager.events.listen(track)
    results = await asyncio.gather(speak(manager, "a"), speak(manager, "b"))
    assert all(audio.startswith(b"RIFF") for _, audio in results)
    assert most_at_once == 1, "two 70 MiB models were resident at once in a 120 MiB budget"


async def test_warmup_runs_after_load_when_the_recipe_asks(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server() + tts("warm", warmup=True) + tts("cold"))
    await manager.load("warm")
    await manager.load("cold")
    assert "warmup_seconds" in manager.slots["warm"].info
    assert "warmup_seconds" not in manager.slots["cold"].info


async def test_heartbeat_refreshes_measured_memory(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(heartbeat_interval="0.2s") + tts("a"))
    await manager.load("a")
    slot = manager.slots["a"]
    slot.rss_bytes = 0  # forget the reading taken at load
    await wait_for(lambda: slot.rss_bytes > 10 * MiB, 3, "a heartbeat to measure the worker")


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_max_concurrency_bounds_calls_running_in_a_worker(
    make_manager: ManagerFactory, concurrency: int
) -> None:
    manager = await make_manager(
        server() + tts("a", max_concurrency=concurrency,
                       options={"latency_ms": 600, "chunks": 2})
    )
    await manager.load("a")
    marks: dict[str, float] = {}

    async def timed(label: str) -> None:
        async with manager.use("a") as lease:
            async with lease.channel.call("speech", {"input": "hi"}, timeout_s=10) as call:
                async for _ in call:
                    marks.setdefault(f"{label}-first", time.monotonic())
            marks[f"{label}-end"] = time.monotonic()

    await asyncio.gather(timed("one"), timed("two"))
    first_end = min(marks["one-end"], marks["two-end"])
    second_start = max(marks["one-first"], marks["two-first"])
    if concurrency == 1:
        assert second_start >= first_end, "two calls ran at once with max_concurrency = 1"
    else:
        assert second_start < first_end, "calls were serialised with max_concurrency = 2"


async def test_leaving_a_stream_early_cancels_the_call_in_the_worker(
    make_manager: ManagerFactory,
) -> None:
    """What happens when an HTTP client disconnects: the handler leaves the stream, the worker
    hears ``cancel`` and stops, long before the call would have finished on its own."""
    manager = await make_manager(server() + tts("a", options={"latency_ms": 5000, "chunks": 5}))
    async with manager.use("a") as lease:
        call = lease.channel.call("speech", {"input": "hi"}, timeout_s=30)
        async with call:
            await anext(call)  # first chunk after ~1 s
        took = await wait_for(lambda: lease.channel.pending_count == 0, 2,
                              "the worker to acknowledge the cancel")
    assert took < 1.5
    slot = manager.slots["a"]
    assert slot.in_flight == 0 and slot.state is State.READY
    pong = await slot.channel.ping(2)  # the worker is still fine
    assert pong.memory["rss"] > 0


# ----------------------------------------------------------------------------- edge paths


async def test_young_models_are_protected_by_min_residency(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server(max_loaded_models=1, min_residency="30s") + tts("a") + tts("b")
    )
    await manager.load("a")
    with pytest.raises(ServiceUnavailable) as caught:
        await manager.load("b")
    assert "'a'" in caught.value.message
    assert caught.value.retry_after_s is not None and 25 <= caught.value.retry_after_s <= 30
    assert manager.slots["a"].state is State.READY
    assert manager.slots["b"].state is State.UNLOADED, "a refusal is not a load failure"


async def test_per_type_cap_evicts_only_that_type(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server().replace("[server]\n", "[server]\nmax_loaded_per_type = { tts = 1 }\n")
        + tts("speech1") + tts("speech2")
        + tts("embedder", type="embedding")
    )
    manager.slots["embedder"].state = State.READY  # an embedding resident, no worker needed
    try:
        await manager.load("speech1")
        await manager.load("speech2")
        assert manager.slots["speech1"].last_eviction["reason"] == "lru"
        assert manager.slots["embedder"].state is State.READY
    finally:
        manager.slots["embedder"].state = State.UNLOADED


async def test_exclusive_group_with_a_pinned_member_refuses(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server() + "[groups.npu]\nexclusive = true\n"
        + tts("npu1", group="npu", pinned=True) + tts("npu2", group="npu")
    )
    await manager.load("npu1")
    with pytest.raises(Conflict) as caught:
        await manager.load("npu2")
    assert "'npu1'" in caught.value.message and "pinned" in caught.value.message


async def test_a_busy_victim_that_does_not_drain_in_time_stays(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(
        server(max_loaded_models=1, drain_timeout="0.3s")
        + tts("slow", options={"latency_ms": 2000, "chunks": 2}) + tts("b")
    )
    await manager.load("slow")
    request = asyncio.create_task(speak(manager, "slow"))
    await wait_for(lambda: manager.slots["slow"].in_flight == 1, 2, "the request to start")
    with pytest.raises(ServiceUnavailable, match="still busy") as caught:
        await manager.load("b")
    assert caught.value.retry_after_s
    assert manager.slots["slow"].state is State.READY
    _, audio = await request
    assert audio.startswith(b"RIFF"), "the busy victim's request was cut off"
    await manager.load("b")  # now it drains at once
    assert manager.slots["slow"].last_eviction["reason"] == "lru"


async def test_forced_unload_cuts_requests_off_with_502(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server() + tts("a", options={"latency_ms": 3000, "chunks": 2}))
    await manager.load("a")
    pid = manager.slots["a"].pid
    assert pid is not None
    request = asyncio.create_task(speak(manager, "a"))
    await wait_for(lambda: manager.slots["a"].in_flight == 1, 2, "the request to start")
    started = time.monotonic()
    await manager.unload("a", force=True)
    assert time.monotonic() - started < 2.5, "force waited for the request"
    with pytest.raises(WorkerFailed):
        await request
    assert_retired(manager, "a", pid, "manual")


async def test_unloading_a_model_while_it_loads_cancels_the_load(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server() + tts("a", options={"load_seconds": 5}))
    request = asyncio.create_task(speak(manager, "a"))
    await wait_for(lambda: manager.slots["a"].pid is not None, 3, "the worker to start")
    pid = manager.slots["a"].pid
    assert pid is not None
    assert await manager.unload("a") is True
    with pytest.raises(ServiceUnavailable, match="cancelled"):
        await request
    slot = manager.slots["a"]
    assert slot.state is State.UNLOADED and slot.last_eviction["reason"] == "manual"
    assert process_gone(pid)


async def test_closing_the_manager_during_a_load_leaves_no_worker(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(server() + tts("a", options={"load_seconds": 5}))
    request = asyncio.create_task(speak(manager, "a"))
    await wait_for(lambda: manager.slots["a"].pid is not None, 3, "the worker to start")
    pid = manager.slots["a"].pid
    assert pid is not None
    await manager.close()
    with pytest.raises(ServiceUnavailable):
        await request
    assert process_gone(pid)


async def test_a_load_that_takes_too_long_is_a_504_and_the_worker_is_killed(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(
        # Silent: the timeout is stall-based, and progress reports would extend it.
        server(load_timeout="1s") + tts("a", options={"load_seconds": 30, "progress": False})
    )
    spawned: list[int] = []
    manager.events.listen(lambda e: spawned.append(e["pid"]) if e["event"] == "spawned" else None)
    with pytest.raises(GatewayTimeout, match=r"load_timeout \(1s; waited"):
        await manager.load("a")
    assert manager.slots["a"].state is State.FAILED
    assert spawned and all(process_gone(pid) for pid in spawned)
    assert len(spawned) == 1, "a timed-out load is not retried"


async def test_a_bug_in_the_load_path_still_answers_every_waiter(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong inside a load, the requests waiting for it get an answer and the
    slot leaves LOADING (a stuck LOADING slot would hang every later request)."""
    manager = await make_manager(server() + tts("a"))

    async def broken(slot: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(manager, "_spawn_and_load", broken)
    results = await asyncio.wait_for(
        asyncio.gather(*(speak(manager, "a") for _ in range(3)), return_exceptions=True), 5
    )
    for result in results:  # what a client sees: 503 + Retry-After, naming the cause
        assert isinstance(result, LemonadeError), result
        assert result.status == 503 and result.retry_after_header() is not None
        assert "simulated bug" in result.message
    assert manager.slots["a"].state is State.FAILED
