"""Translate the manager's slots into the pure planner's plain data.

``policy.plan_admission`` knows nothing about slots, processes or asyncio; this module is the
one place that decides what the planner sees: which slots count as resident, what each one
costs, and which limits apply.
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil

from supervisor import policy
from supervisor.config import Settings
from supervisor.lifecycle import Slot, State

_RESIDENT_STATES = {
    State.READY: policy.ResidentState.READY,
    State.STOPPING: policy.ResidentState.STOPPING,
    State.LOADING: policy.ResidentState.LOADING,
}


def target_of(slot: Slot) -> policy.Target:
    recipe = slot.recipe
    return policy.Target(name=slot.name, type=recipe.type, group=recipe.group,
                         priority=recipe.priority, cost_bytes=slot.cost_bytes())


def residents(slots: Iterable[Slot], *, exclude: Slot) -> list[policy.Resident]:
    """Every slot holding (or reserved to hold) memory, except the one being placed."""
    out = []
    for s in slots:
        if s is exclude or s.state not in _RESIDENT_STATES:
            continue
        if s.state is State.LOADING and not s.admitted:
            continue  # still queued for room: it holds nothing yet
        state = _RESIDENT_STATES[s.state]
        if s.state is State.READY and s.waiters:
            # Just loaded, and the requests that waited for that load have not picked it up
            # yet: evicting it now would starve them (two models under a cap of one would
            # evict each other forever). The planner waits for them like for a load.
            state = policy.ResidentState.LOADING
        out.append(policy.Resident(
            name=s.name, type=s.recipe.type, group=s.recipe.group,
            priority=s.recipe.priority, pinned=s.pinned,
            # A load in progress holds its reservation; a loaded model its measured cost.
            cost_bytes=s.reserved_bytes if s.state is State.LOADING else s.cost_bytes(),
            last_used=s.last_used_mono, loaded_at=s.loaded_at_mono,
            busy=s.busy, state=state,
        ))
    return out


def limits(settings: Settings, memory_budget_bytes: int | None) -> policy.Limits:
    exclusive = frozenset(g.name for g in settings.groups.values() if g.exclusive)
    return policy.Limits(
        max_loaded_models=settings.max_loaded_models,
        max_loaded_per_type=dict(settings.max_loaded_per_type),
        memory_budget_bytes=memory_budget_bytes,
        exclusive_groups=exclusive,
        min_residency_s=settings.min_residency_s,
    )


def resolve_budget(budget: int | str | None) -> int | None:
    if budget == "auto":
        # CPU-only today: the device total is the machine's RAM. GPU totals come with NVML.
        return int(psutil.virtual_memory().total)
    if budget is None or isinstance(budget, int):
        return budget
    raise ValueError(f"memory_budget must be bytes, 'auto' or None, got {budget!r}")
