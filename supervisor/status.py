"""What ``GET /api/v1/status`` (and ``lemonade status``) shows for each model.

Kept apart from the manager so the manager stays about deciding, and this about reporting:
memory is measured from the worker process now (psutil), the idle timeout is the effective
one with the level that set it, and ``expires_at`` is null whenever no timer runs (busy,
pinned, never, or not loaded). A loading model shows its ``progress``: the phase its worker
last reported, the fraction and byte counts where known, and the seconds since the load began
(:mod:`supervisor.load_progress`); null in every other state.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from supervisor.lifecycle import State
from supervisor.manager import Manager


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
            "idle_timeout_s": None if math.isinf(timeout.seconds) else timeout.seconds,
            "idle_timeout_source": timeout.source,
            "expires_at": _iso(slot.timer.expires_at) if slot.timer.armed else None,
            "last_used": _iso(slot.last_used),
            "loaded_at": _iso(slot.loaded_at) if slot.state is State.READY else None,
            "load_seconds": slot.load_seconds,
            "progress": progress.describe(now)
            if progress is not None and slot.state is State.LOADING else None,
            "memory": {"rss_bytes": slot.rss_bytes, "vram_bytes": slot.vram_bytes},
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


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"
