"""Is the manager still making progress? The check behind an unhealthy ``/api/v1/health``.

Every wait in a load or a stop has a deadline (``handshake_timeout``, ``load_timeout``,
``warmup_timeout``, ``admission_timeout``; ``drain_timeout`` + ``stop_grace``), so a slot that
stays ``loading`` with no progress, or ``stopping``, well past them is stuck: a bug of the
kind that hung every cold load in another server while its status page looked healthy. The
heartbeat task ending is the same kind of bug. Each finding is a sentence naming the model,
the state and for how long; an empty list means healthy.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from supervisor.lifecycle import State

if TYPE_CHECKING:
    from supervisor.manager import Manager

#: Beyond the longest deadline, before a wait counts as stuck (a busy machine is slow).
SLACK_S = 10.0


def stalls(manager: Manager) -> list[str]:
    settings = manager.settings
    now = time.monotonic()
    loop_now = asyncio.get_running_loop().time()
    load_bound = SLACK_S + max(settings.handshake_timeout_s, settings.load_timeout_s,
                               settings.warmup_timeout_s, settings.admission_timeout_s)
    stop_bound = SLACK_S + settings.drain_timeout_s + settings.stop_grace_s
    out = []
    for slot in list(manager.slots.values()):
        if slot.state is State.LOADING:
            progress = manager.load_progress.get(slot.name)
            quiet = (loop_now - progress.updated if progress is not None
                     else now - slot.state_since_mono)
            if quiet > load_bound:
                out.append(f"model '{slot.name}' has been loading for {quiet:.0f}s without "
                           f"progress (every load deadline is shorter: {load_bound:g}s)")
        elif slot.state is State.STOPPING:
            stopping = now - slot.state_since_mono
            if stopping > stop_bound:
                out.append(f"model '{slot.name}' has been stopping for {stopping:.0f}s "
                           f"(drain_timeout + stop_grace + slack is {stop_bound:g}s)")
    if manager.heartbeat_task is not None and manager.heartbeat_task.done() \
            and not manager.closed:
        out.append("the worker heartbeat task has ended: hung workers would go unnoticed")
    return out
