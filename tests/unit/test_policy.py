"""Tests for the eviction policy: plain data, a fake ``now``, no processes."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.policy import (
    Eviction,
    EvictionReason,
    Limits,
    Plan,
    Refusal,
    Resident,
    ResidentState,
    Target,
    plan_admission,
)

GiB = 1024**3
NOW = 1000.0
LRU = EvictionReason.LRU
MEMORY = EvictionReason.MEMORY
EXCLUSIVE = EvictionReason.EXCLUSIVE


def res(
    name: str,
    *,
    type: str = "llm",
    group: str | None = None,
    priority: int = 0,
    pinned: bool = False,
    cost: int = 0,
    last_used: float = 0.0,
    loaded_at: float = 0.0,
    busy: bool = False,
    state: ResidentState = ResidentState.READY,
) -> Resident:
    return Resident(
        name=name,
        type=type,
        group=group,
        priority=priority,
        pinned=pinned,
        cost_bytes=cost,
        last_used=last_used,
        loaded_at=loaded_at,
        busy=busy,
        state=state,
    )


def tgt(
    name: str = "new",
    *,
    type: str = "llm",
    group: str | None = None,
    priority: int = 0,
    cost: int = 0,
) -> Target:
    return Target(name=name, type=type, group=group, priority=priority, cost_bytes=cost)


def plan(target: Target, residents: Sequence[Resident], limits: Limits) -> Plan | Refusal:
    return plan_admission(target, residents, limits, NOW)


def evicts(*pairs: tuple[str, EvictionReason]) -> Plan:
    return Plan(tuple(Eviction(name, reason) for name, reason in pairs))


def refusal(result: Plan | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


# --- nothing to do ---------------------------------------------------------------------


def test_no_limits_means_nothing_to_evict() -> None:
    residents = [res("a", cost=10 * GiB), res("b", type="tts")]
    assert plan(tgt(cost=50 * GiB), residents, Limits()) == Plan()


def test_room_left_means_nothing_to_evict() -> None:
    limits = Limits(max_loaded_models=3, max_loaded_per_type={"llm": 2}, memory_budget_bytes=GiB)
    assert plan(tgt(cost=GiB // 2), [res("a", cost=GiB // 2)], limits) == Plan()


def test_empty_server_admits_anything_that_fits() -> None:
    assert plan(tgt(cost=GiB), [], Limits(max_loaded_models=1, memory_budget_bytes=GiB)) == Plan()


# --- count caps ------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used() -> None:
    residents = [res("a", last_used=50), res("b", last_used=10), res("c", last_used=30)]
    assert plan(tgt(), residents, Limits(max_loaded_models=3)) == evicts(("b", LRU))


def test_lru_evicts_as_many_as_needed_oldest_first() -> None:
    residents = [res("a", last_used=50), res("b", last_used=10), res("c", last_used=30)]
    assert plan(tgt(), residents, Limits(max_loaded_models=2)) == evicts(("b", LRU), ("c", LRU))


def test_lru_ties_are_broken_by_name() -> None:
    residents = [res("z", last_used=5), res("m", last_used=5)]
    assert plan(tgt(), residents, Limits(max_loaded_models=2)) == evicts(("m", LRU))


def test_idle_model_is_preferred_over_an_older_busy_one() -> None:
    residents = [res("busy", last_used=1, busy=True), res("idle", last_used=99)]
    assert plan(tgt(), residents, Limits(max_loaded_models=2)) == evicts(("idle", LRU))


def test_busy_model_is_a_victim_when_no_idle_one_can_go() -> None:
    residents = [res("busy", busy=True), res("pin", pinned=True, last_used=-5)]
    assert plan(tgt(), residents, Limits(max_loaded_models=2)) == evicts(("busy", LRU))


def test_per_type_cap_only_evicts_that_type() -> None:
    residents = [
        res("old-llm", type="llm", last_used=1),
        res("tts1", type="tts", last_used=40),
        res("tts2", type="tts", last_used=20),
    ]
    limits = Limits(max_loaded_per_type={"tts": 2, "llm": 1})
    assert plan(tgt(type="tts"), residents, limits) == evicts(("tts2", LRU))


def test_per_type_cap_of_another_type_is_ignored() -> None:
    residents = [res("l1", type="llm"), res("l2", type="llm")]
    assert plan(tgt(type="tts"), residents, Limits(max_loaded_per_type={"llm": 1})) == Plan()


def test_global_cap_counts_every_type() -> None:
    residents = [res("tts", type="tts", last_used=5), res("asr", type="asr", last_used=9)]
    assert plan(tgt(type="llm"), residents, Limits(max_loaded_models=2)) == evicts(("tts", LRU))


def test_priority_does_not_protect_against_count_caps() -> None:
    residents = [res("asr", type="asr", priority=2)]
    limits = Limits(max_loaded_models=1)
    assert plan(tgt(type="llm", priority=0), residents, limits) == evicts(("asr", LRU))


def test_victim_of_the_type_cap_also_counts_for_the_global_cap() -> None:
    residents = [res("t1", type="tts", last_used=50), res("l1", type="llm", last_used=1)]
    limits = Limits(max_loaded_models=2, max_loaded_per_type={"tts": 1})
    assert plan(tgt(type="tts"), residents, limits) == evicts(("t1", LRU))


# --- memory budget ---------------------------------------------------------------------


def test_memory_evicts_lowest_priority_first_even_if_more_recent() -> None:
    residents = [
        res("low", priority=0, cost=4 * GiB, last_used=90),
        res("mid", priority=1, cost=4 * GiB, last_used=1),
    ]
    limits = Limits(memory_budget_bytes=10 * GiB)
    assert plan(tgt(priority=1, cost=4 * GiB), residents, limits) == evicts(("low", MEMORY))


def test_memory_evicts_until_it_fits() -> None:
    residents = [
        res("a", cost=3 * GiB, last_used=1),
        res("b", cost=3 * GiB, last_used=2),
        res("c", cost=3 * GiB, last_used=3),
    ]
    limits = Limits(memory_budget_bytes=10 * GiB)
    result = plan(tgt(cost=6 * GiB), residents, limits)
    assert result == evicts(("a", MEMORY), ("b", MEMORY))


def test_memory_never_evicts_a_higher_priority_model() -> None:
    residents = [res("asr1", type="asr", priority=2, cost=6 * GiB)]
    limits = Limits(memory_budget_bytes=8 * GiB)
    result = refusal(plan(tgt("tts1", type="tts", priority=1, cost=6 * GiB), residents, limits))
    assert result.status == 409
    assert result.blocking == ("asr1",)
    assert "'tts1'" in result.message
    assert "'asr1' has priority 2 > 1" in result.message
    assert "memory_budget=8 GiB" in result.message
    assert result.retry_after_s is None and result.wait_for == ()


def test_memory_evicts_the_lower_priority_model_beside_a_protected_one() -> None:
    residents = [
        res("asr1", type="asr", priority=2, cost=4 * GiB, last_used=1),
        res("llm1", type="llm", priority=0, cost=4 * GiB, last_used=50),
    ]
    limits = Limits(memory_budget_bytes=8 * GiB)
    result = plan(tgt("tts1", type="tts", priority=1, cost=4 * GiB), residents, limits)
    assert result == evicts(("llm1", MEMORY))


def test_equal_priority_may_be_evicted_for_memory() -> None:
    residents = [res("a", priority=1, cost=5 * GiB)]
    limits = Limits(memory_budget_bytes=8 * GiB)
    assert plan(tgt(priority=1, cost=5 * GiB), residents, limits) == evicts(("a", MEMORY))


def test_memory_prefers_idle_victims() -> None:
    residents = [
        res("busy", priority=0, cost=4 * GiB, busy=True),
        res("idle", priority=1, cost=4 * GiB, last_used=99),
    ]
    limits = Limits(memory_budget_bytes=8 * GiB)
    assert plan(tgt(priority=1, cost=4 * GiB), residents, limits) == evicts(("idle", MEMORY))


def test_target_bigger_than_the_budget_is_refused_for_good() -> None:
    limits = Limits(memory_budget_bytes=8 * GiB)
    result = refusal(plan(tgt("huge", cost=12 * GiB), [res("a", cost=GiB)], limits))
    assert result.status == 409
    assert "'huge'" in result.message
    assert "12 GiB" in result.message and "8 GiB" in result.message
    assert result.blocking == ()


def test_sizes_in_messages_are_human_readable() -> None:
    residents = [res("big", priority=5, cost=3 * GiB // 2)]
    limits = Limits(memory_budget_bytes=2 * GiB)
    result = refusal(plan(tgt(cost=GiB), residents, limits))
    assert "1.5 GiB cannot be freed" in result.message
    assert "1 GiB needed" in result.message


# --- models that cannot go -------------------------------------------------------------


def test_pinned_model_is_refused_for_good_and_named() -> None:
    result = refusal(plan(tgt("b"), [res("a", pinned=True)], Limits(max_loaded_models=1)))
    assert result == Refusal(
        status=409,
        message="cannot load 'b': max_loaded_models=1 is reached and 'a' is pinned",
        blocking=("a",),
    )


def test_pinned_model_is_skipped_for_an_evictable_one() -> None:
    residents = [res("pin", pinned=True, last_used=1), res("free", last_used=50)]
    assert plan(tgt(), residents, Limits(max_loaded_models=2)) == evicts(("free", LRU))


def test_young_model_gives_503_with_retry_after() -> None:
    limits = Limits(max_loaded_models=1, min_residency_s=30)
    result = refusal(plan(tgt("b"), [res("a", loaded_at=NOW - 10.5)], limits))
    assert result.status == 503
    assert result.blocking == ("a",)
    assert result.retry_after_s == 20.0  # 19.5 s left, rounded up
    assert result.wait_for == ()
    assert "'a' is within min_residency_s=30" in result.message


def test_retry_after_is_at_least_one_second() -> None:
    limits = Limits(max_loaded_models=1, min_residency_s=30)
    result = refusal(plan(tgt(), [res("a", loaded_at=NOW - 29.999)], limits))
    assert result.retry_after_s == 1.0


def test_retry_after_waits_for_the_youngest_needed_blocker() -> None:
    residents = [res("a", loaded_at=NOW - 20), res("b", loaded_at=NOW - 5)]
    limits = Limits(max_loaded_models=1, min_residency_s=30)
    result = refusal(plan(tgt(), residents, limits))
    assert result.status == 503
    assert set(result.blocking) == {"a", "b"}
    assert result.retry_after_s == 25.0


def test_old_enough_model_is_a_victim() -> None:
    limits = Limits(max_loaded_models=1, min_residency_s=30)
    assert plan(tgt(), [res("a", loaded_at=NOW - 30)], limits) == evicts(("a", LRU))


def test_young_model_is_skipped_for_an_old_one() -> None:
    residents = [res("young", loaded_at=NOW - 1, last_used=1), res("old", last_used=50)]
    limits = Limits(max_loaded_models=2, min_residency_s=30)
    assert plan(tgt(), residents, limits) == evicts(("old", LRU))


@pytest.mark.parametrize("state", [ResidentState.LOADING, ResidentState.STOPPING])
def test_loading_or_stopping_blocker_gives_503_wait_for(state: ResidentState) -> None:
    result = refusal(plan(tgt("b"), [res("a", state=state)], Limits(max_loaded_models=1)))
    assert result.status == 503
    assert result.wait_for == ("a",)
    assert result.blocking == ("a",)
    assert result.retry_after_s is None
    assert result.message == (
        f"cannot load 'b': max_loaded_models=1 is reached and 'a' is still {state.value}"
    )


@pytest.mark.parametrize("state", [ResidentState.LOADING, ResidentState.STOPPING])
def test_loading_or_stopping_model_is_never_a_victim(state: ResidentState) -> None:
    residents = [res("busy", last_used=1, state=state), res("ready", last_used=50)]
    assert plan(tgt(), residents, Limits(max_loaded_models=2)) == evicts(("ready", LRU))


def test_loading_model_occupies_its_memory() -> None:
    residents = [res("loading", cost=6 * GiB, state=ResidentState.LOADING)]
    result = refusal(plan(tgt(cost=4 * GiB), residents, Limits(memory_budget_bytes=8 * GiB)))
    assert result.status == 503 and result.wait_for == ("loading",)


def test_stopping_model_is_waited_for_whatever_its_priority_or_pin() -> None:
    # It is leaving anyway, so waiting helps even though we could never evict it.
    residents = [res("s", priority=9, pinned=True, cost=6 * GiB, state=ResidentState.STOPPING)]
    result = refusal(plan(tgt(cost=4 * GiB), residents, Limits(memory_budget_bytes=8 * GiB)))
    assert result.status == 503 and result.wait_for == ("s",)


def test_transient_blocker_that_suffices_gives_503_beside_a_pinned_one() -> None:
    residents = [res("pin", pinned=True), res("young", loaded_at=NOW - 1)]
    limits = Limits(max_loaded_models=2, min_residency_s=30)
    result = refusal(plan(tgt(), residents, limits))
    assert result.status == 503
    assert result.blocking == ("young",)


def test_pinned_blocker_wins_when_waiting_cannot_help() -> None:
    residents = [res("pin", pinned=True), res("young", loaded_at=NOW - 1)]
    limits = Limits(max_loaded_models=1, min_residency_s=30)
    result = refusal(plan(tgt(), residents, limits))
    assert result.status == 409
    assert result.blocking == ("pin",)


def test_503_names_every_rule_and_blocker() -> None:
    residents = [
        res("n1", group="npu", state=ResidentState.LOADING),
        res("y", cost=6 * GiB, loaded_at=NOW - 2),
    ]
    limits = Limits(
        exclusive_groups=frozenset({"npu"}), memory_budget_bytes=8 * GiB, min_residency_s=10
    )
    result = refusal(plan(tgt(group="npu", cost=4 * GiB), residents, limits))
    assert result.status == 503
    assert result.blocking == ("n1", "y")
    assert result.wait_for == ("n1",)
    assert result.retry_after_s == 8.0
    assert "group 'npu' is exclusive and 'n1' is still loading" in result.message
    assert "memory_budget=8 GiB" in result.message and "'y' is within" in result.message


# --- exclusive groups ------------------------------------------------------------------


def test_exclusive_group_evicts_every_member_even_with_room_to_spare() -> None:
    residents = [
        res("n1", group="npu", last_used=20),
        res("n2", group="npu", last_used=10, busy=True),
        res("n3", group="npu", last_used=5),
        res("g1", group="gpu"),
        res("free"),
    ]
    limits = Limits(
        max_loaded_models=10, memory_budget_bytes=100 * GiB, exclusive_groups=frozenset({"npu"})
    )
    result = plan(tgt(group="npu"), residents, limits)
    assert result == evicts(("n3", EXCLUSIVE), ("n1", EXCLUSIVE), ("n2", EXCLUSIVE))


def test_exclusive_group_evicts_higher_priority_members() -> None:
    limits = Limits(exclusive_groups=frozenset({"npu"}))
    residents = [res("asr", group="npu", priority=2)]
    assert plan(tgt(group="npu", priority=0), residents, limits) == evicts(("asr", EXCLUSIVE))


def test_non_exclusive_group_evicts_nothing() -> None:
    limits = Limits(exclusive_groups=frozenset({"npu"}))
    assert plan(tgt(group="gpu"), [res("g", group="gpu")], limits) == Plan()


def test_exclusive_group_with_a_pinned_member_is_refused_for_good() -> None:
    residents = [
        res("n1", group="npu"),
        res("n2", group="npu", pinned=True),
        res("n3", group="npu", loaded_at=NOW),
    ]
    limits = Limits(exclusive_groups=frozenset({"npu"}), min_residency_s=60)
    result = refusal(plan(tgt("n0", group="npu"), residents, limits))
    assert result.status == 409
    assert result.blocking == ("n2",)
    assert result.message == "cannot load 'n0': group 'npu' is exclusive and 'n2' is pinned"


def test_exclusive_group_with_a_young_member_is_503() -> None:
    residents = [res("n1", group="npu"), res("n2", group="npu", loaded_at=NOW - 50)]
    limits = Limits(exclusive_groups=frozenset({"npu"}), min_residency_s=60)
    result = refusal(plan(tgt(group="npu"), residents, limits))
    assert result.status == 503
    assert result.blocking == ("n2",)
    assert result.retry_after_s == 10.0


# --- minimality and reasons ------------------------------------------------------------


def test_greedy_overshoot_is_pruned() -> None:
    # The cap alone would take 'small' (LRU); the budget then needs 'big' gone, which
    # also satisfies the cap, so 'small' may stay.
    residents = [res("small", cost=GiB, last_used=1), res("big", cost=6 * GiB, last_used=50)]
    limits = Limits(max_loaded_models=2, memory_budget_bytes=8 * GiB)
    assert plan(tgt(cost=4 * GiB), residents, limits) == evicts(("big", MEMORY))


def test_each_rule_gives_its_reason_in_choice_order() -> None:
    residents = [
        res("n1", group="npu", cost=GiB, last_used=90),
        res("a", cost=3 * GiB, last_used=1),
        res("b", cost=3 * GiB, last_used=2),
        res("c", cost=3 * GiB, last_used=3),
    ]
    limits = Limits(
        max_loaded_models=3, memory_budget_bytes=6 * GiB, exclusive_groups=frozenset({"npu"})
    )
    result = plan(tgt(group="npu", cost=3 * GiB), residents, limits)
    assert result == evicts(("n1", EXCLUSIVE), ("a", LRU), ("b", MEMORY))


def test_model_wanted_by_several_rules_keeps_the_first_reason() -> None:
    # 'n1' is in the exclusive group, is the LRU model and is the biggest: one eviction.
    residents = [res("n1", group="npu", cost=6 * GiB, last_used=1), res("x", last_used=9)]
    limits = Limits(
        max_loaded_models=2, memory_budget_bytes=8 * GiB, exclusive_groups=frozenset({"npu"})
    )
    assert plan(tgt(group="npu", cost=4 * GiB), residents, limits) == evicts(("n1", EXCLUSIVE))


def test_zero_cost_models_are_never_memory_victims() -> None:
    residents = [res("free", cost=0, last_used=1), res("big", cost=6 * GiB, last_used=2)]
    limits = Limits(memory_budget_bytes=8 * GiB)
    assert plan(tgt(cost=4 * GiB), residents, limits) == evicts(("big", MEMORY))


# --- bad input -------------------------------------------------------------------------


def test_target_already_resident_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="already resident"):
        plan(tgt("a"), [res("a")], Limits())


def test_duplicate_resident_names_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not unique"):
        plan(tgt(), [res("a"), res("a")], Limits())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_loaded_models": 0},
        {"max_loaded_per_type": {"llm": 0}},
        {"memory_budget_bytes": -1},
        {"min_residency_s": -1.0},
    ],
)
def test_nonsensical_limits_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]


# --- properties ------------------------------------------------------------------------

TYPES = ("llm", "tts", "asr", "embedding")
GROUPS = (None, "gpu", "npu")
PROPERTY_NOW = 100.0


@st.composite
def residents_st(draw: st.DrawFn) -> list[Resident]:
    names = draw(
        st.lists(st.sampled_from([f"m{i}" for i in range(9)]), min_size=2, max_size=7, unique=True)
    )
    return [
        Resident(
            name=name,
            type=draw(st.sampled_from(TYPES)),
            group=draw(st.sampled_from(GROUPS)),
            priority=draw(st.integers(0, 3)),
            pinned=draw(st.sampled_from([False] * 5 + [True])),
            cost_bytes=draw(st.integers(0, 6)) * GiB,
            last_used=float(draw(st.integers(0, 100))),
            loaded_at=float(draw(st.integers(0, 100))),
            busy=draw(st.booleans()),
            state=draw(
                st.sampled_from(
                    [ResidentState.READY] * 6 + [ResidentState.LOADING, ResidentState.STOPPING]
                )
            ),
        )
        for name in names
    ]


target_st = st.builds(
    Target,
    name=st.just("target"),
    type=st.sampled_from(TYPES),
    group=st.sampled_from(GROUPS),
    priority=st.integers(0, 3),
    cost_bytes=st.integers(0, 8).map(lambda n: n * GiB),
)

limits_st = st.builds(
    Limits,
    max_loaded_models=st.sampled_from([None, 1, 2, 3, 4]),
    max_loaded_per_type=st.dictionaries(st.sampled_from(TYPES), st.integers(1, 2)),
    memory_budget_bytes=st.sampled_from([None, *range(4, 17)]).map(
        lambda n: None if n is None else n * GiB
    ),
    exclusive_groups=st.frozensets(st.sampled_from(["gpu", "npu"])),
    min_residency_s=st.sampled_from([0.0, 10.0, 50.0]),
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rules_hold(
    target: Target, residents: Sequence[Resident], limits: Limits, gone: set[str]
) -> bool:
    """An independent statement of the rules, with the target counted as resident."""
    stay = [r for r in residents if r.name not in gone] + [
        res(target.name, type=target.type, group=target.group, cost=target.cost_bytes)
    ]
    if target.group in limits.exclusive_groups:
        if sum(r.group == target.group for r in stay) > 1:
            return False
    cap = limits.max_loaded_per_type.get(target.type)
    if cap is not None and sum(r.type == target.type for r in stay) > cap:
        return False
    if limits.max_loaded_models is not None and len(stay) > limits.max_loaded_models:
        return False
    budget = limits.memory_budget_bytes
    return budget is None or sum(r.cost_bytes for r in stay) <= budget


def evictable_now(r: Resident, limits: Limits) -> bool:
    return (
        r.state == ResidentState.READY
        and not r.pinned
        and PROPERTY_NOW - r.loaded_at >= limits.min_residency_s
    )


@FAST
@given(target=target_st, residents=residents_st(), limits=limits_st)
def test_property_every_answer_is_sound(
    target: Target, residents: list[Resident], limits: Limits
) -> None:
    result = plan_admission(target, residents, limits, PROPERTY_NOW)
    # Same input, same answer, whatever order the residents come in.
    assert plan_admission(target, residents[::-1], limits, PROPERTY_NOW) == result
    if isinstance(result, Plan):
        check_plan(target, residents, limits, result)
    else:
        check_refusal(target, residents, limits, result)


def check_plan(target: Target, residents: list[Resident], limits: Limits, result: Plan) -> None:
    """Victims may go, every rule holds afterwards, and no victim could be spared."""
    by_name = {r.name: r for r in residents}
    names = [e.name for e in result.evictions]
    assert len(set(names)) == len(names)
    assert target.name not in names
    for eviction in result.evictions:
        victim = by_name[eviction.name]
        assert evictable_now(victim, limits)
        if eviction.reason is EvictionReason.MEMORY:
            assert victim.priority <= target.priority
        if eviction.reason is EvictionReason.EXCLUSIVE:
            assert victim.group == target.group and victim.group in limits.exclusive_groups
    gone = set(names)
    assert rules_hold(target, residents, limits, gone)
    for name in names:
        assert not rules_hold(target, residents, limits, gone - {name}), f"{name} is not needed"


def check_refusal(
    target: Target, residents: list[Resident], limits: Limits, result: Refusal
) -> None:
    """A refusal names who is in the way, and its status matches what they are."""
    assert target.name in result.message
    budget = limits.memory_budget_bytes
    if budget is not None and target.cost_bytes > budget:
        assert result.status == 409 and result.blocking == ()
        return
    assert result.blocking, result
    by_name = {r.name: r for r in residents}
    assert target.name not in result.blocking
    for name in result.blocking:
        assert name in by_name and repr(name) in result.message
    blockers = [by_name[n] for n in result.blocking]
    if result.status == 409:
        assert result.wait_for == () and result.retry_after_s is None
        for r in blockers:
            assert r.pinned or r.priority > target.priority
    else:
        assert result.status == 503
        for r in blockers:
            assert not evictable_now(r, limits)
            assert r.state == ResidentState.STOPPING or not r.pinned
        assert result.wait_for == tuple(r.name for r in blockers if r.state != ResidentState.READY)
        young = [
            r
            for r in blockers
            if r.state == ResidentState.READY
            and PROPERTY_NOW - r.loaded_at < limits.min_residency_s
        ]
        if young:
            assert result.retry_after_s is not None and result.retry_after_s >= 1
            assert result.retry_after_s == math.ceil(result.retry_after_s)
        else:
            assert result.retry_after_s is None


@FAST
@given(target=target_st, residents=residents_st(), limits=limits_st)
def test_property_refused_only_when_no_set_of_evictable_models_would_do(
    target: Target, residents: list[Resident], limits: Limits
) -> None:
    # With nobody protected by priority, every evictable model is fair game for every rule,
    # so the planner must find a plan whenever one exists.
    residents = [
        dataclasses.replace(r, priority=min(r.priority, target.priority)) for r in residents
    ]
    result = plan_admission(target, residents, limits, PROPERTY_NOW)
    evictable = [r.name for r in residents if evictable_now(r, limits)]
    exists = any(
        rules_hold(target, residents, limits, set(subset))
        for k in range(len(evictable) + 1)
        for subset in itertools.combinations(evictable, k)
    )
    assert isinstance(result, Plan) == exists
