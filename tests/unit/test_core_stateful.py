"""C13: a Hypothesis state machine over the manager's pure core, with a fake clock.

The real pieces: the eviction planner (``policy.plan_admission``), the placement translation
(``placement.residents/target_of/limits``), ``Slot`` with its legal transitions and the
generation-stamped ``IdleTimer`` (on a fake loop, so time is a number the test advances).
The machine plays the manager's sequence for each event: request begin (load with evictions
when cold), request end (arm the timer when idle), timer fire (re-check the generation),
crash, manual unload, pin/unpin, a failing load. After every step the invariants of the
fault matrix hold: count caps, per-type caps, exclusive groups, the memory budget, pinned
and busy models never evicted, exactly one live timer per idle unpinned ready model and
none anywhere else, counters never negative.

PR size: 150 examples x 50 steps (seconds); ``--soak``: 20,000 x 100.
"""

from __future__ import annotations

import heapq
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from supervisor import lifecycle, policy
from supervisor.lifecycle import IdleTimer, Slot, State
from supervisor.placement import limits, residents, target_of
from tests.conftest import soak_size
from tests.helpers import settings_from_toml

MIB = 2**20
CONFIG = """
[server]
max_loaded_models = 3
max_loaded_per_type = { llm = 1 }
memory_budget = "100MiB"
min_residency = "0.5s"
[groups.npu]
exclusive = true
[models.a]
recipe = "synthetic"
type = "tts"
group = "npu"
memory = "40MiB"
[models.b]
recipe = "synthetic"
type = "tts"
group = "npu"
memory = "30MiB"
priority = 3
[models.c]
recipe = "synthetic"
type = "llm"
memory = "50MiB"
[models.d]
recipe = "synthetic"
type = "embedding"
memory = "20MiB"
[models.e]
recipe = "synthetic"
type = "asr"
memory = "30MiB"
[models.f]
recipe = "synthetic"
type = "llm"
memory = "10MiB"
"""
with tempfile.TemporaryDirectory() as _tmp:
    SETTINGS = settings_from_toml(Path(_tmp), CONFIG)
NAMES = tuple(SETTINGS.models)
LIMITS = limits(SETTINGS, 100 * MIB)
IDLE_S = 2.0


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float, callback: Callable[..., None],
                 args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just enough of an event loop for IdleTimer: call_later and a clock we advance."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._heap: list[tuple[float, int, FakeHandle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeHandle:
        handle = FakeHandle(self, self.now + delay, callback, args)
        heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
        return handle

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, handle = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback(*handle.args)
        self.now = end

    def live(self) -> list[FakeHandle]:
        return [h for _, _, h in self._heap if not h.cancelled]


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = FakeLoop()
        self._patch = pytest.MonkeyPatch()
        fake_asyncio = SimpleNamespace(get_running_loop=lambda: self.loop)
        self._patch.setattr(lifecycle, "asyncio", fake_asyncio)
        self.slots: dict[str, Slot] = {}
        for name, recipe in SETTINGS.models.items():
            slot = Slot(recipe=recipe, timer=IdleTimer(lambda gen, n=name: self._expired(n, gen)))
            self.slots[name] = slot
        self.evicted: list[tuple[str, bool, bool]] = []  # (name, was pinned, was busy)
        self.fired_stale = 0

    def teardown(self) -> None:
        self._patch.undo()

    # ------------------------------------------------------------- the manager's moves

    def _retire(self, slot: Slot, *, evicted: bool = False) -> None:
        slot.timer.cancel()
        if evicted:
            self.evicted.append((slot.name, slot.pinned, slot.busy))
        slot.transition(State.STOPPING)
        slot.worker = slot.channel = None
        slot.admitted, slot.reserved_bytes = False, 0
        slot.transition(State.UNLOADED)

    def _became_idle(self, slot: Slot) -> None:
        if slot.state is not State.READY or slot.busy:
            return
        if slot.pinned:
            slot.timer.cancel()
        else:
            slot.timer.arm(IDLE_S)

    def _expired(self, name: str, generation: int) -> None:
        slot = self.slots[name]
        if generation != slot.timer.generation:
            self.fired_stale += 1
            return
        slot.timer.cancel()
        if slot.state is State.READY and not slot.busy:
            self._retire(slot)

    def _admit(self, slot: Slot) -> bool:
        outcome = policy.plan_admission(target_of(slot), residents(self.slots.values(),
                                        exclude=slot), LIMITS, self.loop.time())
        if isinstance(outcome, policy.Refusal):
            assert outcome.status in (409, 503), outcome
            return False
        victims = [self.slots[e.name] for e in outcome.evictions]
        if any(v.busy for v in victims):
            return False  # the manager drains busy victims first; here: try again later
        for victim in victims:
            self._retire(victim, evicted=True)
        slot.transition(State.LOADING)
        slot.admitted, slot.reserved_bytes = True, target_of(slot).cost_bytes
        return True

    # ------------------------------------------------------------- rules

    @rule(name=st.sampled_from(NAMES))
    def begin(self, name: str) -> None:
        slot = self.slots[name]
        if slot.state in (State.UNLOADED, State.FAILED):
            if not self._admit(slot):
                return
            slot.worker = slot.channel = object()
            slot.loaded_at_mono = self.loop.time()
            slot.transition(State.READY)
        if slot.state is State.READY:
            slot.in_flight += 1
            slot.timer.cancel()
            slot.touch(self.loop.time())

    @rule(name=st.sampled_from(NAMES))
    def end(self, name: str) -> None:
        slot = self.slots[name]
        if slot.in_flight:
            slot.in_flight -= 1
            slot.touch(self.loop.time())
            self._became_idle(slot)

    @rule(name=st.sampled_from(NAMES))
    def load_fails(self, name: str) -> None:
        slot = self.slots[name]
        if slot.state in (State.UNLOADED, State.FAILED) and self._admit(slot):
            slot.admitted, slot.reserved_bytes = False, 0
            slot.transition(State.FAILED)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 1.99, 2.0, 2.01, 5.0]))
    def tick(self, seconds: float) -> None:
        self.loop.advance(seconds)

    @rule(name=st.sampled_from(NAMES))
    def crash(self, name: str) -> None:
        slot = self.slots[name]
        if slot.state is State.READY:
            slot.in_flight = 0  # its requests got their 502
            self._retire(slot)

    @rule(name=st.sampled_from(NAMES))
    def unload(self, name: str) -> None:
        slot = self.slots[name]
        if slot.state is State.READY and not slot.busy:
            self._retire(slot)

    @rule(name=st.sampled_from(NAMES), pinned=st.booleans())
    def pin(self, name: str, pinned: bool) -> None:
        slot = self.slots[name]
        slot.pinned_override = pinned
        self._became_idle(slot)

    @precondition(lambda self: any(s.timer.armed for s in self.slots.values()))
    @rule(data=st.data())
    def stale_timer_fires(self, data: st.DataObject) -> None:
        # A timer that fired but whose callback ran after a cancel: the old generation.
        name = data.draw(st.sampled_from([n for n, s in self.slots.items() if s.timer.armed]))
        slot = self.slots[name]
        state = slot.state
        self._expired(name, slot.timer.generation - 1)
        assert slot.state is state

    # ------------------------------------------------------------- invariants

    @invariant()
    def caps_groups_and_budget_hold(self) -> None:
        resident = [s for s in self.slots.values() if s.state in (State.READY, State.LOADING)]
        assert len(resident) <= 3
        assert sum(1 for s in resident if s.recipe.type == "llm") <= 1
        assert sum(1 for s in resident if s.recipe.group == "npu") <= 1
        assert sum(s.cost_bytes() for s in resident) <= 100 * MIB

    @invariant()
    def never_evicted_pinned_or_busy(self) -> None:
        for name, pinned, busy in self.evicted:
            assert not pinned and not busy, name

    @invariant()
    def exactly_the_idle_ready_unpinned_models_have_one_live_timer(self) -> None:
        live: dict[str, int] = {}
        for handle in self.loop.live():
            name = next(n for n, s in self.slots.items()
                        if handle.callback is s.timer._on_expired)
            live[name] = live.get(name, 0) + 1
            assert handle.args == (self.slots[name].timer.generation,), name
        for name, slot in self.slots.items():
            idle_ready = slot.state is State.READY and not slot.busy and not slot.pinned
            assert live.get(name, 0) == (1 if idle_ready else 0), (name, slot.state, live)
            assert slot.timer.armed == idle_ready, name

    @invariant()
    def counters_and_reservations(self) -> None:
        for slot in self.slots.values():
            assert slot.in_flight >= 0 and slot.waiters >= 0
            if slot.state in (State.UNLOADED, State.FAILED):
                assert slot.reserved_bytes == 0 and not slot.admitted
                assert slot.in_flight == 0


def test_core_state_machine() -> None:
    run = CoreMachine.TestCase
    run.settings = settings(
        max_examples=soak_size(150, 20_000),
        stateful_step_count=soak_size(50, 100),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    run().runTest()
