"""The planner with one budget per device: RAM on ``cpu``, VRAM on each ``cuda:N``.

Plain data and a fake ``now``, like ``test_policy.py``; the rules checked here are the ones
that only exist once there is more than one device: every device stays within its budget at
once, victims are taken only among models that hold memory on the device that is short, and
priorities and pins hold per device.
"""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.policy import (
    EvictionReason,
    Limits,
    Plan,
    Refusal,
    Resident,
    Target,
    plan_admission,
)

GiB = 1024**3
NOW = 1000.0


def res(name: str, *, ram: int = 0, gpu: Mapping[str, int] | None = None, priority: int = 0,
        pinned: bool = False, last_used: float = 0.0) -> Resident:
    return Resident(name=name, type="llm", group=None, priority=priority, pinned=pinned,
                    cost_bytes=ram, last_used=last_used, loaded_at=0.0, busy=False,
                    device_costs=dict(gpu or {}))


def tgt(name: str = "new", *, ram: int = 0, gpu: Mapping[str, int] | None = None,
        priority: int = 0) -> Target:
    return Target(name=name, type="llm", group=None, priority=priority, cost_bytes=ram,
                  device_costs=dict(gpu or {}))


LIMITS = Limits(memory_budget_bytes=64 * GiB, device_budgets={"cuda:0": 16 * GiB,
                                                               "cuda:1": 8 * GiB})


def victims(outcome: Plan | Refusal) -> list[str]:
    assert isinstance(outcome, Plan), outcome
    return [e.name for e in outcome.evictions]


def test_a_full_gpu_evicts_only_models_on_that_gpu() -> None:
    residents = [
        res("cpu-big", ram=40 * GiB, last_used=1),      # oldest, but holds no VRAM
        res("gpu0-a", ram=1 * GiB, gpu={"cuda:0": 10 * GiB}, last_used=5),
        res("gpu1-a", ram=1 * GiB, gpu={"cuda:1": 6 * GiB}, last_used=2),
    ]
    outcome = plan_admission(tgt(ram=1 * GiB, gpu={"cuda:0": 8 * GiB}), residents, LIMITS, NOW)
    assert victims(outcome) == ["gpu0-a"]
    assert outcome.evictions[0].reason is EvictionReason.MEMORY  # type: ignore[union-attr]


def test_a_full_ram_budget_never_evicts_for_vram_nor_the_reverse() -> None:
    residents = [res("gpu0-a", ram=0, gpu={"cuda:0": 15 * GiB}, last_used=1),
                 res("cpu-a", ram=60 * GiB, last_used=9)]
    # A CPU model that needs RAM takes the RAM holder, not the VRAM holder.
    assert victims(plan_admission(tgt(ram=10 * GiB), residents, LIMITS, NOW)) == ["cpu-a"]
    # A GPU model that needs VRAM takes the VRAM holder, not the RAM holder.
    assert victims(plan_admission(tgt(gpu={"cuda:0": 4 * GiB}), residents, LIMITS,
                                  NOW)) == ["gpu0-a"]


def test_every_device_stays_within_its_budget_at_once() -> None:
    residents = [res("a", ram=50 * GiB, last_used=1),
                 res("b", ram=1 * GiB, gpu={"cuda:0": 12 * GiB}, last_used=2)]
    outcome = plan_admission(tgt(ram=20 * GiB, gpu={"cuda:0": 8 * GiB}), residents, LIMITS, NOW)
    assert sorted(victims(outcome)) == ["a", "b"]


def test_a_model_larger_than_its_device_is_refused_for_good_naming_the_device() -> None:
    outcome = plan_admission(tgt(gpu={"cuda:1": 9 * GiB}), [], LIMITS, NOW)
    assert isinstance(outcome, Refusal)
    assert outcome.status == 409
    assert "cuda:1" in outcome.message and "9 GiB" in outcome.message
    assert "8 GiB" in outcome.message


def test_priorities_and_pins_hold_per_device() -> None:
    residents = [res("important", gpu={"cuda:0": 10 * GiB}, priority=5),
                 res("pinned", gpu={"cuda:0": 4 * GiB}, pinned=True),
                 res("elsewhere", gpu={"cuda:1": 7 * GiB})]
    outcome = plan_admission(tgt(gpu={"cuda:0": 4 * GiB}, priority=1), residents, LIMITS, NOW)
    assert isinstance(outcome, Refusal)
    assert outcome.status == 409
    assert "cuda:0" in outcome.message
    assert "'important' has priority 5 > 1" in outcome.message
    assert "'pinned' is pinned" in outcome.message
    assert "elsewhere" not in outcome.blocking


def test_a_device_without_a_budget_is_not_limited() -> None:
    residents = [res("a", gpu={"cuda:2": 100 * GiB})]
    assert victims(plan_admission(tgt(gpu={"cuda:2": 100 * GiB}), residents, LIMITS, NOW)) == []


_sizes = st.integers(min_value=0, max_value=20).map(lambda n: n * GiB)


@settings(max_examples=200, deadline=None)
@given(
    residents=st.lists(
        st.tuples(_sizes, st.sampled_from(["cuda:0", "cuda:1"]), _sizes,
                  st.integers(0, 3), st.booleans()),
        max_size=6,
    ),
    target=st.tuples(_sizes, st.sampled_from(["cuda:0", "cuda:1"]), _sizes, st.integers(0, 3)),
)
def test_a_plan_leaves_every_device_within_budget_and_only_takes_useful_victims(
    residents: list[tuple[int, str, int, int, bool]], target: tuple[int, str, int, int]
) -> None:
    limits = Limits(memory_budget_bytes=40 * GiB,
                    device_budgets={"cuda:0": 20 * GiB, "cuda:1": 12 * GiB})
    # Residents as they could be: each already fits its device.
    placed: list[Resident] = []
    used = {"cpu": 0, "cuda:0": 0, "cuda:1": 0}
    for i, (ram, device, vram, priority, pinned) in enumerate(residents):
        budget = dict(limits.budgets())
        if used["cpu"] + ram > budget["cpu"] or used[device] + vram > budget[device]:
            continue
        used["cpu"] += ram
        used[device] += vram
        placed.append(res(f"r{i}", ram=ram, gpu={device: vram}, priority=priority,
                          pinned=pinned, last_used=float(i)))
    ram, device, vram, priority = target
    new = tgt(ram=ram, gpu={device: vram}, priority=priority)
    outcome = plan_admission(new, placed, limits, NOW)
    if isinstance(outcome, Refusal):
        return
    gone = {e.name for e in outcome.evictions}
    stay = [r for r in placed if r.name not in gone]
    for dev, budget in limits.budgets():
        assert sum(r.charge(dev) for r in stay) + new.charge(dev) <= budget, dev
    for r in placed:
        if r.name in gone:
            assert not r.pinned and r.priority <= new.priority
            # Each victim held memory on a device the target needed room on.
            assert any(r.charge(dev) > 0 and new.charge(dev) > 0 for dev, _ in limits.budgets())
