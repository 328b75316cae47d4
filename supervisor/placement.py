"""Translate the manager's slots into the pure planner's plain data, and choose devices.

``policy.plan_admission`` knows nothing about slots, processes or asyncio; this module is the
one place that decides what the planner sees: which slots count as resident, what each one
costs on which device, and which limits apply; and, for ``device = "auto"``, which devices a
model may go to and which of their plans wins (:func:`choose`).

Costs per device: a model on the CPU costs its RAM there. A model placed on a GPU costs its
VRAM on that GPU and its RAM on ``cpu``; until it has been measured, its VRAM is the recipe's
``vram`` (or ``memory`` when the recipe gives no ``vram``, which is what ``memory`` meant for
GPU models before devices had budgets) and its RAM is ``memory`` only when ``vram`` is given.
A model no device was chosen for (no GPU is known) is charged to ``cpu`` as before: its VRAM
when it reports any, else its RAM.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from supervisor import policy
from supervisor.cluster import nodes
from supervisor.config import Settings
from supervisor.lifecycle import Slot, State
from workers.kinds import KINDS

_RESIDENT_STATES = {
    State.READY: policy.ResidentState.READY,
    State.STOPPING: policy.ResidentState.STOPPING,
    State.LOADING: policy.ResidentState.LOADING,
}


#: Kinds that can run on an NVIDIA GPU (torch or CTranslate2; workers/kinds.py). ONNX kinds
#: run on the CPU.
GPU_KINDS = frozenset(name for name, kind in KINDS.items() if kind.gpu)


def charges(slot: Slot, device: str | None) -> tuple[int, dict[str, int]]:
    """(RAM bytes, {device: bytes}) the slot would hold when placed on ``device``."""
    recipe = slot.recipe
    if device is None or device == policy.CPU:
        return slot.cost_bytes(), {}
    if device.startswith(nodes.NODE_PREFIX):  # a node of a Ray cluster
        return nodes.charges(slot, device)
    if slot.measured_device == device and slot.measured_device_bytes is not None:
        return slot.measured_ram_bytes or 0, {device: slot.measured_device_bytes}
    if recipe.vram_bytes is not None:
        return recipe.memory_bytes or 0, {device: recipe.vram_bytes}
    return 0, {device: recipe.memory_bytes or 0}


def holds_memory(slot: Slot) -> bool:
    return slot.state in _RESIDENT_STATES


def held(slot: Slot) -> tuple[int, dict[str, int]]:
    """(RAM bytes, {device: bytes}) a resident slot is charged: a load in progress its
    reservation, a loaded model its measured (or estimated) cost where it was placed."""
    if slot.state is State.LOADING:
        return slot.reserved_bytes, dict(slot.reserved_device_bytes)
    return charges(slot, slot.placed_device)


def target_of(slot: Slot, device: str | None = None) -> policy.Target:
    recipe = slot.recipe
    ram, others = charges(slot, device)
    return policy.Target(name=slot.name, type=recipe.type, group=recipe.group,
                         priority=recipe.priority, cost_bytes=ram, device_costs=others)


def candidate_devices(slot: Slot, gpus: list[str]) -> list[str | None]:
    """Where the slot may go, in the order tried; None = no device chosen (the worker's own
    ``device`` setting decides, and the model is charged to the CPU)."""
    recipe = slot.recipe
    if recipe.device.startswith("cuda:") or recipe.device.startswith("npu"):
        return [recipe.device]
    if recipe.device == policy.CPU:
        return [policy.CPU]
    can_gpu = recipe.kind in GPU_KINDS or bool(recipe.options.get("stand_in_vram_mb"))
    if not gpus or not can_gpu:
        return [policy.CPU if recipe.device == "auto" and gpus else None]
    if recipe.device == "cuda" or recipe.fallback == "none":
        return list(gpus)
    return [*gpus, policy.CPU]


@dataclass(frozen=True)
class Candidate:
    """One device's answer for a model: its plan (or refusal), and how it compares."""

    device: str | None
    outcome: policy.Plan | policy.Refusal
    room_bytes: int = 0  # the device's budget left before this model (for ties)
    evicted_bytes: int = 0  # what the plan's victims hold on this device


def choose(candidates: list[Candidate]) -> Candidate:
    """The placement among the candidate devices.

    A GPU that fits without evictions first (the one with most room left); else the GPU
    whose evictions free the fewest bytes there; the CPU only when no GPU can take the model;
    else the refusal for the device tried first.
    """
    plans = [c for c in candidates if isinstance(c.outcome, policy.Plan)]
    gpu_plans = [c for c in plans if c.device not in (None, policy.CPU)]
    fits = [c for c in gpu_plans if not c.outcome.evictions]  # type: ignore[union-attr]
    if fits:
        return max(fits, key=lambda c: (c.room_bytes, str(c.device)))
    if gpu_plans:
        return min(gpu_plans, key=lambda c: (c.evicted_bytes, str(c.device)))
    return plans[0] if plans else candidates[0]


def residents(slots: Iterable[Slot], *, exclude: Slot) -> list[policy.Resident]:
    """Every slot holding (or reserved to hold) memory, except the one being placed."""
    out = []
    for s in slots:
        if s is exclude or s.state not in _RESIDENT_STATES:
            continue
        if s.state is State.LOADING and not s.admitted:
            continue  # still queued for room: it holds nothing yet
        state = _RESIDENT_STATES[s.state]
        ram, others = held(s)
        if s.state is State.READY and s.waiters:
            # Just loaded, and the requests that waited for that load have not picked it up
            # yet: evicting it now would starve them (two models under a cap of one would
            # evict each other forever). The planner waits for them like for a load.
            state = policy.ResidentState.LOADING
        out.append(policy.Resident(
            name=s.name, type=s.recipe.type, group=s.recipe.group,
            priority=s.recipe.priority, pinned=s.pinned,
            cost_bytes=ram, device_costs=others,
            last_used=s.last_used_mono, loaded_at=s.loaded_at_mono,
            busy=s.busy, state=state,
        ))
    return out


def limits(settings: Settings, memory_budget_bytes: int | None,
           device_budgets: dict[str, int] | None = None) -> policy.Limits:
    exclusive = frozenset(g.name for g in settings.groups.values() if g.exclusive)
    return policy.Limits(
        max_loaded_models=settings.max_loaded_models,
        max_loaded_per_type=dict(settings.max_loaded_per_type),
        memory_budget_bytes=memory_budget_bytes,
        exclusive_groups=exclusive,
        min_residency_s=settings.min_residency_s,
        device_budgets=device_budgets or {},
    )


def resolve_budget(budget: int | str | None) -> int | None:
    if budget == "auto":
        # CPU-only today: the device total is the machine's RAM. GPU totals come with NVML.
        return int(psutil.virtual_memory().total)
    if budget is None or isinstance(budget, int):
        return budget
    raise ValueError(f"memory_budget must be bytes, 'auto' or None, got {budget!r}")
