"""Crash and hang detection for every worker: an exit watcher per process and one heartbeat.

Split out of the manager (which owns the slots and the one retire path): a worker that exits
while its model is ready is a crash, reported and retired with reason ``crash`` (the next
request reloads it); a worker that leaves a ping unanswered for ``heartbeat_timeout`` is hung
and is killed, which its exit watcher then handles the same way. Pongs also refresh each
model's measured RSS and VRAM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from supervisor.errors import LemonadeError
from supervisor.lifecycle import Slot, State
from supervisor.process import WorkerProcess

if TYPE_CHECKING:
    from supervisor.manager import Manager

log = logging.getLogger(__name__)


class Watcher:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def watch_exit(self, slot: Slot, worker: WorkerProcess) -> None:
        m = self.manager
        await asyncio.shield(worker.exited)
        if slot.worker is not worker or slot.state is not State.READY:
            return  # an orderly stop, already handled by retire()
        slot.restarts += 1
        how = worker.describe_exit()
        log.error("worker %d for %s %s unexpectedly; it will be reloaded on the next request%s",
                  worker.pid, slot.name, how,
                  f" (last output: {worker.last_output()})" if worker.output_tail else "")
        m.events.publish("crashed", slot.name, pid=worker.pid, exit=how)
        # force: the process is gone, so nothing can drain; its requests already got 502.
        await m.retire_quietly(slot, "crash", force=True)

    async def heartbeat_loop(self) -> None:
        m = self.manager
        interval = m.settings.heartbeat_interval_s
        timeout = m.settings.heartbeat_timeout_s
        pinging: set[str] = set()
        while True:
            await asyncio.sleep(interval)
            for slot in list(m.slots.values()):
                if (slot.state is State.READY and slot.channel is not None
                        and slot.name not in pinging):
                    pinging.add(slot.name)
                    task = m.spawn_task(self._ping(slot, timeout), f"ping-{slot.name}")
                    task.add_done_callback(
                        functools.partial(lambda name, _t: pinging.discard(name), slot.name))

    async def _ping(self, slot: Slot, limit_s: float) -> None:
        worker, channel = slot.worker, slot.channel
        if worker is None or channel is None:
            return
        try:
            pong = await channel.ping(limit_s)
        except TimeoutError:
            log.error("worker %d for %s did not answer a ping within %gs; killing it",
                      worker.pid, slot.name, limit_s)
            worker.kill()
            return
        except LemonadeError:
            return  # the channel closed: the exit watcher handles it
        if slot.worker is worker:
            worker.note_reported_memory(pong.memory)
            slot.vram_bytes = pong.memory.get("vram", 0)
            slot.rss_bytes = worker.rss_bytes() or pong.memory.get("rss", 0)
