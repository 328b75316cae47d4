"""What ``GET /api/v1/status`` (and ``lemonade status``) shows for each model.

Kept apart from the manager so the manager stays about deciding, and this about reporting:
memory is measured from the worker process now (psutil), the idle timeout is the effective
one with the level that set it, and ``expires_at`` is null whenever no timer runs (busy,
pinned, never, or not loaded). A loading model shows its ``progress``: the phase its worker
last reported, the fraction and byte counts where known, and the seconds since the load began
(:mod:`supervisor.load_progress`); null in every other state.

:func:`device_rows` is the ``devices`` section: per device (``cpu`` and each GPU or declared
device) its total, the budget our models get now, what our models hold there, what other
programs hold (where a probe can tell) and what is free.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import psutil

from supervisor import policy
from supervisor.cluster import nodes
from supervisor.lifecycle import State
from supervisor.manager import Manager
from supervisor.placement import held, holds_memory


def memory_by_device(slot: Any) -> dict[str, int]:
    """What a model holds (or has reserved) on each device right now."""
    if not holds_memory(slot):
        return {}
    if slot.state is State.LOADING:
        out = {policy.CPU: slot.reserved_bytes, **slot.reserved_device_bytes}
    elif slot.placed_device in (None, policy.CPU):
        out = {policy.CPU: slot.rss_bytes}
    else:
        out = {policy.CPU: slot.rss_bytes, slot.placed_device: slot.vram_bytes}
    return {device: n for device, n in out.items() if n}


def device_rows(manager: Manager) -> list[dict[str, Any]]:
    """The ``devices`` section of the status (call after ``manager.refresh_memory()``)."""
    ours: dict[str, int] = {}
    for slot in manager.slots.values():
        if not holds_memory(slot):
            continue
        ram, others = held(slot)
        for device, n in {policy.CPU: ram, **others}.items():
            ours[device] = ours.get(device, 0) + n
    ram = psutil.virtual_memory()
    rows = [{
        "name": policy.CPU, "label": "RAM", "seen": True, "total_bytes": int(ram.total),
        "budget_bytes": manager.budget_for_models(), "headroom_bytes": 0,
        "used_by_models_bytes": ours.get(policy.CPU, 0),
        "used_by_others_bytes": None, "free_bytes": int(ram.available), "releasing": False,
    }]
    for row in manager.inventory.describe():
        row["used_by_models_bytes"] = ours.get(row["name"], 0)
        rows.append(row)
    if manager.cluster is not None:
        # Each Ray node's budgets (cluster/nodes.py): NODE/ram in bytes, NODE/<resource> in
        # thousandths of a unit.
        for name, budget in sorted(manager.admission.limits().device_budgets.items()):
            rows.append({
                "name": name, "label": "Ray node", "seen": True, "total_bytes": budget,
                "budget_bytes": budget, "headroom_bytes": 0,
                "used_by_models_bytes": ours.get(name, 0), "used_by_others_bytes": None,
                "free_bytes": max(0, budget - ours.get(name, 0)), "releasing": False,
                "node": name.partition("/")[0],
                "unit": "bytes" if name.endswith("/" + nodes.RAM) else "thousandths",
            })
    return rows


def model_rows(manager: Manager) -> list[dict[str, Any]]:
    manager.refresh_memory()
    now = asyncio.get_running_loop().time()
    out = []
    for slot in manager.slots.values():
        timeout = manager.effective_idle_timeout(slot)
        recipe = slot.recipe
        progress = manager.load_progress.get(slot.name)
        out.append({
            "name": slot.name,
            "kind": recipe.kind,
            "type": recipe.type,
            "state": slot.state.value,
            "pid": slot.pid,
            "in_flight": slot.in_flight,
            "waiting": slot.waiters,
            "device": slot.device or recipe.device,
            "node": nodes.node_of(slot.placed_device),
            "idle_timeout_s": None if math.isinf(timeout.seconds) else timeout.seconds,
            "idle_timeout_source": timeout.source,
            "expires_at": _iso(slot.timer.expires_at) if slot.timer.armed else None,
            "last_used": _iso(slot.last_used),
            "loaded_at": _iso(slot.loaded_at) if slot.state is State.READY else None,
            "load_seconds": slot.load_seconds,
            "progress": progress.describe(now)
            if progress is not None and slot.state is State.LOADING else None,
            "memory": {"rss_bytes": slot.rss_bytes, "vram_bytes": slot.vram_bytes},
            "placed_device": slot.placed_device,
            "memory_by_device": memory_by_device(slot),
            "memory_estimate_bytes": slot.cost_bytes(),
            "group": recipe.group,
            "priority": recipe.priority,
            "pinned": slot.pinned,
            "last_eviction": None if slot.last_eviction is None else {
                "reason": slot.last_eviction["reason"],
                "at": _iso(slot.last_eviction["at"]),
            },
            "restarts": slot.restarts,
            "failures": slot.failures,
            "last_error": slot.last_error,
            "retry_after_s": math.ceil(slot.cooldown_remaining(now))
            if slot.state is State.FAILED else None,
            "info": slot.info,
        })
    return out


def iso_time(wall: float) -> str:
    """``2026-12-02T18:21:44.123Z``: the form every time in the status has."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def _iso(wall: float | None) -> str | None:
    return None if wall is None else iso_time(wall)
