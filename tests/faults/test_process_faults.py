"""Fault matrix, process lifecycle rows (P1-P12, P16-P18): real workers, real signals."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest

from supervisor import process
from supervisor.lifecycle import State
from tests.faults.conftest import HarnessFactory, wait_until
from tests.helpers import process_gone


async def test_p1_crash_during_load_answers_every_waiter_503(harness: HarnessFactory) -> None:
    h = await harness({"m": {"fault": "crash_on_load"}})
    outcomes = await asyncio.gather(*(h.speak("m") for _ in range(3)))
    slot = h.manager.slots["m"]
    for out in outcomes:
        assert out.status == 503, out.error
        assert out.error is not None and out.error.code == "model_load_failed"
        assert out.error.retry_after_header() is not None
        # The exit code and the worker's last stderr line, for the human reading it.
        assert "17" in out.error.message and "crash_on_load" in out.error.message
    assert slot.state is State.FAILED
    assert not slot.timer.armed and slot.reserved_bytes == 0 and slot.worker is None
    assert h.manager.audit() == []


async def test_p2_segfault_while_idle_is_reaped_and_the_next_request_reloads(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {}})
    first = await h.speak("m")
    assert first.status == 200 and first.pid is not None
    os.kill(first.pid, signal.SIGSEGV)
    took = await wait_until(lambda: h.manager.slots["m"].state is State.UNLOADED, 2.0,
                            "the crashed model to be unloaded")
    assert took < 1.0
    assert process_gone(first.pid)  # reaped: not even a zombie
    assert not h.manager.slots["m"].timer.armed
    second = await h.speak("m")
    assert second.status == 200 and second.pid != first.pid


async def test_p2_segfault_during_a_call_is_a_502_naming_the_signal(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "segfault_mid_call"}})
    out = await h.speak("m")
    assert out.status == 502
    await wait_until(lambda: h.manager.slots["m"].state is State.UNLOADED, 2.0, "unload")
    assert out.pid is not None and process_gone(out.pid)


async def test_p3_sigkill_during_a_plain_request_is_one_502(harness: HarnessFactory) -> None:
    h = await harness({"m": {"fault": "sigkill_mid_call", "fault_after_chunks": 0}})
    out = await h.speak("m")
    assert out.status == 502 and out.chunks == []
    await wait_until(lambda: out.pid is not None and process_gone(out.pid), 1.0, "reap")
    await wait_until(lambda: h.manager.slots["m"].state is State.UNLOADED, 1.0, "unload")
    assert h.manager.slots["m"].restarts == 1


async def test_p4_sigkill_mid_stream_leaves_a_strict_prefix_and_no_replay(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "sigkill_mid_call", "fault_after_chunks": 2,
                              "chunks": 6}})
    # Pieces 100 ms apart, so the reference arrives one piece per frame.
    clean = await harness({"m": {"chunks": 6, "latency_ms": 600}})
    out = await h.speak("m")
    reference = await clean.speak("m")
    assert out.status == 502
    assert len(reference.chunks) == 6
    # Exactly the two pieces sent before the kill: a strict prefix, nothing duplicated.
    assert b"".join(out.chunks) == b"".join(reference.chunks[:2])
    assert h.manager.spawns == 1  # no replay


async def test_p5_hung_worker_mid_request_is_a_504_then_killed(harness: HarnessFactory) -> None:
    h = await harness({"m": {"fault": "hang_mid_call"}},
                      server={"call_timeout": "1s", "heartbeat_timeout": "0.5s"})
    await h.manager.load("m")
    out = await h.speak("m")
    assert out.status == 504
    assert out.seconds < 1.5
    assert out.pid is not None
    # A stopped process never handles SIGTERM: the liveness probe kills it outright.
    await wait_until(lambda: process_gone(out.pid), 2.0, "the hung worker to be killed")
    await wait_until(lambda: h.manager.slots["m"].state is State.UNLOADED, 2.0, "unload")


async def test_p6_heartbeat_stops_while_idle_and_the_worker_is_killed(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "hang_after_load", "fault_delay_ms": 100}},
                      server={"heartbeat_interval": "0.2s", "heartbeat_timeout": "0.4s"})
    await h.manager.load("m")
    pid = h.pid_of("m")
    assert pid is not None
    started = time.monotonic()
    await wait_until(lambda: process_gone(pid), 3.0, "the silent worker to be killed")
    assert time.monotonic() - started <= 2 * 0.2 + 0.4 + 0.5 + 0.1
    await wait_until(lambda: h.manager.slots["m"].state is State.UNLOADED, 2.0, "unload")


async def test_p7_worker_ignoring_sigterm_is_killed_after_the_grace(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "ignore_sigterm"}}, server={"stop_grace": "1s"})
    await h.manager.load("m")
    pid = h.pid_of("m")
    started = time.monotonic()
    await h.manager.unload("m")
    took = time.monotonic() - started
    assert took <= 1.0 + 0.5, took
    assert pid is not None and process_gone(pid)


async def test_p8_grandchild_holding_the_pipes_dies_with_the_group(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "fork_grandchild"}}, server={"stop_grace": "0.5s"})
    slot = await h.manager.load("m")
    grandchild = slot.info["grandchild_pid"]
    assert not process_gone(grandchild)
    started = time.monotonic()
    await h.manager.unload("m")
    assert time.monotonic() - started <= 0.5 + 0.25 + 2
    await wait_until(lambda: process_gone(grandchild), 2.0, "the grandchild to die")


@pytest.mark.parametrize("fault", [{"load_seconds": 5, "progress": False},
                                   {"fault": "hang_on_load"}], ids=["silent", "stopped"])
async def test_p9_load_without_progress_times_out_504(harness: HarnessFactory,
                                                      fault: dict[str, object]) -> None:
    h = await harness({"m": fault}, server={"load_timeout": "1s"})
    outcomes = await asyncio.gather(*(h.speak("m") for _ in range(2)))
    for out in outcomes:
        assert out.status == 504, out.error
        assert 0.8 <= out.seconds <= 1.2 + 0.5, out.seconds
    slot = h.manager.slots["m"]
    assert slot.worker is None and slot.reserved_bytes == 0 and not slot.timer.armed


async def test_p10_slow_load_with_progress_is_not_a_timeout(harness: HarnessFactory) -> None:
    h = await harness({"m": {"load_seconds": 1.5}}, server={"load_timeout": "0.5s"})
    out = await h.speak("m")
    assert out.status == 200, out.error
    assert out.seconds >= 1.5


async def test_p11_every_waiter_leaves_during_the_load(harness: HarnessFactory) -> None:
    h = await harness({"m": {"load_seconds": 0.6}})
    waiters = [asyncio.ensure_future(h.speak("m")) for _ in range(3)]
    await asyncio.sleep(0.2)
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    slot = h.manager.slots["m"]
    # Policy: the load completes and the model stays idle with its timer armed.
    await wait_until(lambda: slot.state is State.READY, 3.0, "the load to finish")
    assert slot.in_flight == 0 and slot.waiters == 0 and slot.timer.armed
    assert h.manager.audit() == []


async def test_p12_crash_loop_opens_the_breaker(harness: HarnessFactory) -> None:
    h = await harness({"m": {"fault": "crash_on_load"}},
                      server={"load_failure_cooldown": "1s"})
    first = await h.speak("m")
    assert first.status == 503
    spawns = h.manager.spawns
    assert spawns <= 2  # the load plus the one evict-and-retry
    for _ in range(10):
        out = await h.speak("m")
        assert out.status == 503 and out.error is not None
        assert out.error.retry_after_header() is not None
        assert out.seconds < 0.01  # answered by the breaker, no spawn
    assert h.manager.spawns == spawns
    await asyncio.sleep(1.1)  # cooldown over: one probe load is allowed (half-open)
    probe = await h.speak("m")
    assert probe.status == 503 and h.manager.spawns > spawns


async def test_p16_real_memory_error_on_load_is_insufficient_memory(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "oom_on_load"}})
    out = await h.speak("m")
    assert out.status == 503 and out.error is not None
    assert out.error.code == "insufficient_memory", out.error.code
    assert out.error.retry_after_header() is not None


async def test_p16_real_memory_error_in_a_call_keeps_the_worker(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "oom_mid_call", "fault_after_chunks": 0}})
    out = await h.speak("m")
    assert out.status == 503 and out.error is not None
    assert out.error.worker_code == "out_of_memory"
    assert out.error.retry_after_header() is not None
    assert h.manager.slots["m"].state is State.READY  # an OOM is not a crash
    assert h.manager.slots["m"].restarts == 0


async def test_p17_fork_failure_is_503_spawn_failed(
    harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_fork(*args: object, **kwargs: object) -> object:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    h = await harness({"m": {}})
    monkeypatch.setattr(process, "_create_worker_process", no_fork)
    out = await h.speak("m")
    assert out.status == 503 and out.error is not None
    assert out.error.code == "spawn_failed" and out.error.retry_after_header() is not None
    slot = h.manager.slots["m"]
    assert slot.worker is None and slot.reserved_bytes == 0
    assert h.manager.spawns == 1  # not retried in a loop


async def test_p18_runtime_dir_removed_under_a_running_server(harness: HarnessFactory) -> None:
    h = await harness({"a": {}, "b": {}})
    first = await h.speak("a")
    assert first.status == 200
    assert h.manager.runtime_dir is not None
    old_dir = h.manager.runtime_dir
    shutil.rmtree(old_dir)
    again = await h.speak("a")  # the connected worker does not need the dir
    assert again.status == 200 and again.pid == first.pid
    other = await h.speak("b")  # a new worker gets a fresh private dir
    assert other.status == 200
    assert h.manager.runtime_dir != old_dir
    assert (h.manager.runtime_dir.stat().st_mode & 0o777) == 0o700


async def test_p15_begin_shutdown_cancels_a_load_in_progress(harness: HarnessFactory) -> None:
    h = await harness({"m": {"load_seconds": 5}})
    waiter = asyncio.ensure_future(h.speak("m"))
    await wait_until(lambda: h.manager.slots["m"].pid is not None, 3.0, "the spawn")
    pid = h.manager.slots["m"].pid
    started = time.monotonic()
    h.manager.begin_shutdown()
    out = await waiter
    assert out.status == 503 and out.error is not None and out.error.retry_after_header()
    assert time.monotonic() - started < 1.0
    assert pid is not None
    await wait_until(lambda: process_gone(pid), 2.0, "the loading worker to be killed")
    assert (await h.speak("m")).status == 503  # shutting down: nothing new starts


async def test_h5_per_model_queue_limit_is_429_with_retry_after(harness: HarnessFactory) -> None:
    h = await harness({"m": {"latency_ms": 400}},
                      recipe_keys={"m": {"max_concurrency": 2, "max_queue": 1}})
    await h.manager.load("m")  # an admin load is never refused by the queue limit
    outcomes = await asyncio.gather(*(h.speak("m") for _ in range(10)))
    statuses = sorted(out.status for out in outcomes)
    assert statuses == [200] * 3 + [429] * 7, statuses
    for out in outcomes:
        if out.error is not None:
            assert out.error.code == "model_queue_full"
            assert out.error.retry_after_header() == "1"
    assert h.manager.slots["m"].in_flight == 0
    assert (await h.speak("m")).status == 200  # the limit is on what is held, not a ban
