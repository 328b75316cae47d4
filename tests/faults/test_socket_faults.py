"""Fault matrix, socket protocol rows (S1-S7, S9, S10): the worker is untrusted."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile

import pytest

from supervisor.errors import WorkerFailed
from supervisor.lifecycle import State
from supervisor.process import _accept_from
from tests.faults.conftest import HarnessFactory, rss_bytes, wait_until
from tests.helpers import process_gone

MIB = 1024 * 1024


@pytest.mark.parametrize("fault", [
    "garbage_mid_call",     # S1
    "oversize_mid_call",    # S2
    "bomb_mid_call",        # S3
    "truncated_mid_call",   # S4
    "wrong_id_mid_call",    # S6
])
async def test_s1_to_s6_protocol_violation_is_502_and_the_worker_is_killed(
    harness: HarnessFactory, fault: str,
) -> None:
    h = await harness({"bad": {"fault": fault, "fault_after_chunks": 1}, "good": {}})
    await h.manager.load("bad")
    before = rss_bytes()
    out = await h.speak("bad")
    grown = rss_bytes() - before
    assert out.status == 502, out.error
    assert len(out.chunks) == 1  # what came before the violation, nothing forged after it
    assert out.pid is not None
    await wait_until(lambda: process_gone(out.pid), 1.0, "the worker to be killed")
    await wait_until(lambda: h.manager.slots["bad"].state is State.UNLOADED, 1.0, "unload")
    assert grown < 10 * MIB, f"router RSS grew {grown / MIB:.1f} MiB"
    # The router is fine: another model serves, and the broken one reloads on demand.
    assert (await h.speak("good")).status == 200


async def test_s5_late_reply_is_never_given_to_the_next_request(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "late_reply", "fault_delay_ms": 800, "chunks": 3}},
                      recipe_keys={"m": {"max_concurrency": 2}})
    await h.manager.load("m")
    long_text, short_text = "a long sentence for the first caller " * 3, "hi"
    first = asyncio.ensure_future(h.speak("m", long_text, timeout_s=0.3))
    await asyncio.sleep(0.4)
    second = asyncio.ensure_future(h.speak("m", short_text, timeout_s=5))
    one, two = await asyncio.gather(first, second)
    assert one.status == 504
    assert two.status == 200, two.error
    # The second caller got its own answer: the sample count of its own (short) text.
    samples = sum(len(c) for c in two.chunks) // 2
    assert two.result["samples"] == samples
    assert samples < 0.5 * 24000  # "hi" is the 0.2 s minimum; the long text is seconds
    assert h.manager.slots["m"].state is State.READY  # a late answer is not a violation


async def test_s7_flood_to_a_slow_consumer_keeps_router_memory_flat(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"fault": "flood", "flood_chunks": 5000,
                              "flood_chunk_bytes": 64 * 1024}},
                      server={"heartbeat_interval": "0.2s", "heartbeat_timeout": "0.5s"})
    await h.manager.load("m")
    before = rss_bytes()
    got = 0
    async with h.manager.use("m") as lease:
        async with lease.channel.call("speech", {"input": "x"}, timeout_s=30) as call:
            async for _ in call:
                got += 1
                if got == 10:
                    # A client that stalls while the worker floods: without backpressure the
                    # router would buffer everything the worker sends meanwhile (~300 MiB).
                    await asyncio.sleep(1.5)
                if got >= 1000:
                    break
    grown = rss_bytes() - before
    assert grown < 20 * MIB, f"router RSS grew {grown / MIB:.1f} MiB under a flood"
    # Backpressure paused reading; the heartbeat must not have taken that for a hang.
    assert h.manager.slots["m"].restarts == 0


async def test_s9_a_foreign_process_on_the_worker_socket_is_refused() -> None:
    directory = tempfile.mkdtemp(prefix="lms-", dir="/tmp")
    path = os.path.join(directory, "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.setblocking(False)
    # The "worker" is a process that never connects; this test process connects instead.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        intruder.connect(path)
        with pytest.raises(WorkerFailed, match="other than the worker"):
            await _accept_from(listener, proc, 5.0, "m", __import__("collections").deque())
    finally:
        intruder.close()
        listener.close()
        proc.kill()
        await proc.wait()
        os.unlink(path)
        os.rmdir(directory)


async def test_s9_socket_dir_is_private_and_the_socket_is_gone_once_connected(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {}})
    assert h.manager.runtime_dir is not None
    assert (h.manager.runtime_dir.stat().st_mode & 0o777) == 0o700
    await h.manager.load("m")
    # Unlinked on connect: nobody else can even try a second connection.
    assert not list(h.manager.runtime_dir.glob("*.sock"))


async def test_s10_concurrent_streams_on_one_worker_each_get_their_own(
    harness: HarnessFactory,
) -> None:
    h = await harness({"m": {"latency_ms": 100, "chunks": 5}},
                      recipe_keys={"m": {"max_concurrency": 5}})
    await h.manager.load("m")
    texts = ["a" * n for n in (5, 20, 40, 60, 80)]
    tasks = [asyncio.ensure_future(h.speak("m", t)) for t in texts]
    cancelled = asyncio.ensure_future(h.speak("m", "b" * 70))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    outcomes = await asyncio.gather(*tasks)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    reference = await harness({"m": {"chunks": 5}})
    for text, out in zip(texts, outcomes, strict=True):
        assert out.status == 200, out.error
        expected = await reference.speak("m", text)
        # Every byte its own, in order, none missing (how the bytes were cut into frames
        # depends on timing: a worker joins pieces that were waiting side by side).
        assert b"".join(out.chunks) == b"".join(expected.chunks)
    assert h.manager.slots["m"].in_flight == 0
