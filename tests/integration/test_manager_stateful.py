"""Hypothesis drives a real Manager (real synthetic workers) through random interleavings of
requests, unloads, crashes and timeout changes, checking the lifecycle invariants after
every step: timers only on idle ready models, no process behind an unloaded slot, the cap
held, every request answered with audio or an acceptable error, nothing left at the end.

Small by default because it spawns real processes (6 examples x 20 steps, ~10 s);
``--soak`` makes it 1000 x 30, and ``LEMONADE_STATEFUL_EXAMPLES`` / ``_STEPS`` set any size.
One model (``f``) breaks the protocol on every call, and ``Manager.audit()`` is an invariant.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from supervisor.errors import LemonadeError
from supervisor.lifecycle import State
from supervisor.manager import Manager
from tests.conftest import soak_size
from tests.helpers import process_gone, settings_from_toml

MODELS = ("a", "b", "c")
CONFIG = """
[server]
auto_unload_timer = "0.4s"
max_loaded_models = 1
stop_grace = "2s"
drain_timeout = "5s"
load_failure_cooldown = "0.2s"
""" + "".join(
    f"""
[models.{name}]
recipe = "synthetic"
type = "tts"
[models.{name}.options]
latency_ms = {latency}
chunks = 2
"""
    for name, latency in zip(MODELS, (30, 80, 150), strict=True)
) + """
[models.f]
recipe = "synthetic"
type = "tts"
[models.f.options]
chunks = 2
fault = "garbage_mid_call"
"""
#: What a client may legitimately get while models are being unloaded and killed under it:
#: 502 (its worker died or was force-unloaded), 503 (its load was cancelled, or a cooldown).
ACCEPTABLE_STATUSES = {502, 503}


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.manager = Manager(settings_from_toml(Path(self.tmp.name), CONFIG))
        self.loop.run_until_complete(self.manager.start())
        self.requests: list[asyncio.Task[Any]] = []
        self.pids: set[int] = set()
        self.completed = 0

    # ------------------------------------------------------------------ helpers

    def run(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.collect()

    async def _speak(self, name: str, keep_alive_s: float | None) -> bytes:
        async with self.manager.use(name, keep_alive_s=keep_alive_s) as lease:
            self.pids.add(lease.pid)
            call = lease.channel.call("speech", {"input": "hi"}, timeout_s=20)
            async with call:
                return b"".join(await call.collect())

    def collect(self) -> None:
        for task in [t for t in self.requests if t.done()]:
            self.requests.remove(task)
            error = task.exception()
            if error is None:
                assert task.result().startswith(b"RIFF")
                self.completed += 1
            else:
                assert isinstance(error, LemonadeError), repr(error)
                assert error.status in ACCEPTABLE_STATUSES, (error.status, error.message)

    # ------------------------------------------------------------------ rules

    @rule(name=st.sampled_from(MODELS),
          keep_alive=st.sampled_from([None, None, None, 0.0, 0.3, float("inf")]))
    def request(self, name: str, keep_alive: float | None) -> None:
        self.requests.append(self.loop.create_task(self._speak(name, keep_alive)))
        self.run(0.02)

    @rule()
    def faulty_request(self) -> None:
        # A worker that breaks the protocol mid-call (S1): 502, killed, cap still held.
        self.requests.append(self.loop.create_task(self._speak("f", None)))
        self.run(0.05)

    @rule(seconds=st.sampled_from([0.05, 0.2, 0.5]))
    def wait(self, seconds: float) -> None:
        self.run(seconds)

    @rule(name=st.sampled_from(MODELS), force=st.booleans())
    def unload(self, name: str, force: bool) -> None:
        task = self.loop.create_task(self.manager.unload(name, force=force))
        self.run(0.05)
        self.loop.run_until_complete(asyncio.wait_for(task, 10))

    @rule()
    def unload_all(self) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.manager.unload_all(), 10))
        self.collect()

    @rule(name=st.sampled_from(MODELS))
    def crash(self, name: str) -> None:
        pid = self.manager.slots[name].pid
        if pid is not None and self.manager.slots[name].state is State.READY:
            os.kill(pid, signal.SIGKILL)
        self.run(0.1)

    @rule(name=st.sampled_from([*MODELS, None]), seconds=st.sampled_from([0.2, 1.0, float("inf")]))
    def set_timeout(self, name: str | None, seconds: float) -> None:
        async def in_loop() -> None:  # timers are armed on the running loop
            self.manager.set_idle_timeout(name, seconds)

        self.loop.run_until_complete(in_loop())

    # ------------------------------------------------------------------ invariants

    @invariant()
    def manager_audit_is_clean(self) -> None:
        assert self.manager.audit() == []

    @invariant()
    def slots_are_consistent(self) -> None:
        resident = 0
        for slot in self.manager.slots.values():
            assert slot.in_flight >= 0 and slot.waiters >= 0, slot.name
            if slot.timer.armed:
                assert slot.state is State.READY, f"{slot.name}: timer armed while {slot.state}"
                assert not slot.busy, f"{slot.name}: timer armed while busy"
            if slot.state is State.READY:
                assert slot.worker is not None and slot.channel is not None, slot.name
            if slot.state in (State.UNLOADED, State.FAILED):
                assert slot.worker is None and slot.channel is None, slot.name
                assert slot.reserved_bytes == 0 and not slot.admitted, slot.name
            if slot.state is State.READY or (slot.state is State.LOADING and slot.admitted):
                resident += 1
        assert resident <= 1, "max_loaded_models = 1 exceeded"

    def teardown(self) -> None:
        try:
            if self.requests:
                self.loop.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*self.requests, return_exceptions=True), 30)
                )
                self.collect()
            self.loop.run_until_complete(self.manager.close())
            for slot in self.manager.slots.values():
                assert slot.in_flight == 0 and not slot.timer.armed, slot.name
            for pid in self.pids:
                assert process_gone(pid), f"worker {pid} outlived the manager"
        finally:
            self.loop.close()
            self.tmp.cleanup()


@pytest.mark.slow
def test_manager_lifecycle_invariants_hold_under_random_interleavings() -> None:
    run = ManagerMachine.TestCase
    run.settings = settings(
        max_examples=int(os.environ.get("LEMONADE_STATEFUL_EXAMPLES") or soak_size(6, 1000)),
        stateful_step_count=int(os.environ.get("LEMONADE_STATEFUL_STEPS") or soak_size(20, 30)),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    run().runTest()
