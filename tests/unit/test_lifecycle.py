"""The slot state machine and the generation-stamped idle timer, without processes."""

from __future__ import annotations

import asyncio

import pytest

from supervisor.config import Recipe
from supervisor.lifecycle import IdleTimer, IllegalTransition, Slot, State

LEGAL = {
    (State.UNLOADED, State.LOADING),
    (State.LOADING, State.READY),
    (State.LOADING, State.FAILED),
    (State.LOADING, State.UNLOADED),
    (State.READY, State.STOPPING),
    (State.STOPPING, State.UNLOADED),
    (State.STOPPING, State.READY),
    (State.FAILED, State.LOADING),
    (State.FAILED, State.UNLOADED),
}


def make_slot(**recipe: object) -> Slot:
    fields: dict[str, object] = {"name": "m", "kind": "synthetic", "type": "tts"}
    fields.update(recipe)
    return Slot(recipe=Recipe(**fields), timer=IdleTimer(lambda generation: None))  # type: ignore[arg-type]


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_only_the_documented_transitions_are_legal(old: State, new: State) -> None:
    slot = make_slot()
    slot.state = old
    if (old, new) in LEGAL:
        slot.transition(new)
        assert slot.state is new
    else:
        with pytest.raises(IllegalTransition) as caught:
            slot.transition(new)
        assert old.value in str(caught.value) and new.value in str(caught.value)
        assert "'m'" in str(caught.value)
        assert slot.state is old


def test_cost_is_the_estimate_until_measured() -> None:
    slot = make_slot(memory_bytes=100)
    assert slot.cost_bytes() == 100
    slot.measured_cost_bytes = 42
    assert slot.cost_bytes() == 42
    assert make_slot().cost_bytes() == 0


def test_pinned_override_wins_over_the_recipe() -> None:
    slot = make_slot(pinned=True)
    assert slot.pinned
    slot.pinned_override = False
    assert not slot.pinned


async def test_timer_fires_with_the_generation_it_was_armed_with() -> None:
    fired: list[int] = []
    timer = IdleTimer(fired.append)
    timer.arm(0.01)
    armed_generation = timer.generation
    assert timer.armed and timer.expires_at is not None
    await asyncio.sleep(0.05)
    assert fired == [armed_generation]


async def test_cancel_stops_the_timer_and_bumps_the_generation() -> None:
    fired: list[int] = []
    timer = IdleTimer(fired.append)
    timer.arm(0.01)
    before = timer.generation
    timer.cancel()
    assert not timer.armed and timer.expires_at is None
    assert timer.generation > before
    await asyncio.sleep(0.05)
    assert fired == []


async def test_rearming_makes_an_earlier_firing_stale() -> None:
    """A timer that fired but whose callback was queued before a re-arm carries an old
    generation; the manager compares it with the current one and ignores it."""
    fired: list[int] = []
    timer = IdleTimer(fired.append)
    timer.arm(0.01)
    first = timer.generation
    timer.arm(0.02)
    assert timer.generation != first
    await asyncio.sleep(0.06)
    assert fired == [timer.generation]
