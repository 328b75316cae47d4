"""Starting a model's worker: spawn or fork the process, load the model, warm it up, measure.

Split out of the manager, which decides *when* a model loads (single flight, admission,
retries) and owns the slot; this module does the one job of bringing a worker process from
nothing to ready and recording what it costs: the device it really used, its RAM (what will
come back when it exits), and its VRAM on the GPU it was placed on (the driver's figure where
a probe lists the pid, else what the worker reports). A failure at any step stops the process
before the error goes up, so no half-started worker outlives its load.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from supervisor import policy
from supervisor.channel import Channel
from supervisor.cluster import nodes
from supervisor.errors import GatewayTimeout, LemonadeError, WorkerFailed
from supervisor.lifecycle import Slot
from supervisor.process import WorkerProcess
from supervisor.rundir import create_runtime_dir
from workers.protocol import WARMUP_OP, ErrorCode, Progress

if TYPE_CHECKING:
    from supervisor.manager import Manager

log = logging.getLogger(__name__)


class WorkerStarter:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def start(self, slot: Slot) -> WorkerProcess:
        """Spawn (or fork) the slot's worker, load the model, warm it up, measure it.

        On any failure the process is stopped and the slot forgets it before the error
        propagates; on success the slot holds the worker and its channel.
        """
        m = self.manager
        assert m.runtime_dir is not None, "Manager.start() was not called"
        if not m.runtime_dir.is_dir():
            # A tmp cleaner removed it under us: workers already connected do not need it
            # (their sockets were unlinked on connect); new ones get a fresh private dir.
            log.warning("runtime dir %s disappeared; creating a new one", m.runtime_dir)
            m.runtime_dir = create_runtime_dir(m.runtime_base)
        recipe = slot.recipe
        loop = asyncio.get_running_loop()
        started = loop.time()
        slot.spawn_seq += 1
        on_node = nodes.node_of(slot.placed_device) is not None
        try:
            if on_node:
                assert m.cluster is not None
                worker: WorkerProcess = await m.cluster.launch(
                    recipe, slot.placed_device or "", data_dir=m.settings.data_dir,
                    handshake_timeout_s=m.settings.handshake_timeout_s,
                    max_concurrency=recipe.max_concurrency)
            else:
                worker = await WorkerProcess.spawn(
                    model=recipe.name, kind=recipe.kind, runtime_dir=m.runtime_dir,
                    seq=slot.spawn_seq, handshake_timeout_s=m.settings.handshake_timeout_s,
                    max_concurrency=recipe.max_concurrency, data_dir=m.settings.data_dir,
                    zygotes=m.zygotes,
                    on_bar=functools.partial(m.load_progress.take_bar, recipe.name),
                )
        except GatewayTimeout:
            raise self._timeout("handshake", loop.time() - started) from None
        channel = Channel(recipe.name, worker.reader, worker.writer,
                          on_broken=lambda reason: worker.kill(),
                          on_lost=worker.connection_lost,
                          hang_timeout_s=m.settings.heartbeat_timeout_s)

        def report_progress(progress: Progress) -> None:
            m.load_progress.report(recipe.name, progress.fraction, progress.message,
                                      done_bytes=progress.done_bytes,
                                      total_bytes=progress.total_bytes)

        slot.worker, slot.channel = worker, channel
        how = {"fork": "forked", "spawn": "spawned"}.get(
            worker.started_by, f"started on Ray node {nodes.node_of(slot.placed_device)}")
        log.info("worker %d for %s %s (kind %s, hello after %.0f ms)", worker.pid, recipe.name,
                 how, recipe.kind, worker.hello_seconds * 1000)
        m.events.publish("spawned", recipe.name, pid=worker.pid, how=worker.started_by,
                            hello_seconds=round(worker.hello_seconds, 4))
        phase, started = "load", loop.time()
        try:
            loaded = await channel.load(
                name=recipe.name, type=recipe.type,
                device=_worker_device(slot),
                options=dict(recipe.options),
                timeout_s=m.settings.load_timeout_s,  # without progress: stall-based
                on_progress=report_progress,
            )
            phase, started = "warmup", loop.time()
            warmup_s = await self._warmup(slot, channel) if recipe.warmup else None
        except BaseException as e:
            m.forget_process(slot)
            await asyncio.shield(worker.stop(0))
            if isinstance(e, WorkerFailed) and not worker.alive:
                e.message = f"{e.message} ({worker.describe_exit()}: {worker.last_output()})"
            if isinstance(e, GatewayTimeout):
                raise self._timeout(phase, loop.time() - started) from None
            raise
        slot.device = loaded.device
        slot.info = dict(loaded.info)
        slot.info["worker_start"] = worker.started_by
        if worker.remote:
            handle = worker.handle  # type: ignore[attr-defined]
            slot.info["ray_actor_pid"] = handle.actor_pid
            slot.info["ray_actor_seconds"] = round(handle.actor_seconds, 4)
        slot.info["hello_seconds"] = round(worker.hello_seconds, 4)
        if warmup_s is not None:
            slot.info["warmup_seconds"] = round(warmup_s, 4)
        if worker.started_by == "fork" and m.zygotes is not None:
            m.zygotes.learn(recipe.kind)
        worker.note_reported_memory(loaded.memory)
        slot.vram_bytes = loaded.memory.get("vram", 0)
        slot.rss_bytes = max(worker.rss_bytes(), loaded.memory.get("rss", 0))
        ram = worker.freed_on_exit_bytes() or slot.rss_bytes
        if on_node:
            # Charged on its node (cluster/nodes.py): the RAM it reports. Its VRAM, if any,
            # is inside the GPU resource Ray gave it.
            slot.measured_device = slot.placed_device
            slot.measured_ram_bytes = ram
            slot.measured_device_bytes = slot.vram_bytes
            slot.measured_cost_bytes = ram
        elif slot.placed_device not in (None, policy.CPU):
            # Charged per device: the VRAM on its GPU (the driver's figure where the probe
            # lists the pid), the RAM on the CPU.
            by_driver = m.inventory.refresh(m.worker_pids()).get(worker.pid)
            if by_driver:
                slot.vram_bytes = by_driver
            slot.measured_device = slot.placed_device
            slot.measured_device_bytes = slot.vram_bytes
            slot.measured_ram_bytes = ram
            slot.measured_cost_bytes = ram
        else:
            slot.measured_cost_bytes = slot.vram_bytes or ram
        return worker

    def _timeout(self, phase: str, waited_s: float) -> GatewayTimeout:
        """A 504 that names the phase whose deadline ran out, its setting and the wait."""
        settings = self.manager.settings
        limit, what = {
            "handshake": (settings.handshake_timeout_s,
                          "the worker process did not start and say hello"),
            "load": (settings.load_timeout_s, "the load sent no progress and did not finish"),
            "warmup": (settings.warmup_timeout_s, "the warmup call did not finish"),
        }[phase]
        return GatewayTimeout(
            f"{what} within {phase}_timeout ({limit:g}s; waited {waited_s:.1f}s)",
            code="timeout",
        )

    async def _warmup(self, slot: Slot, channel: Channel) -> float | None:
        """Run the kind's warmup call; returns its seconds, or None if the kind has none."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            limit = self.manager.settings.warmup_timeout_s
            async with channel.call(WARMUP_OP, {}, timeout_s=limit) as call:
                await call.collect()
        except LemonadeError as e:
            if e.worker_code != ErrorCode.UNSUPPORTED:
                raise
            log.debug("kind %s has no warmup", slot.recipe.kind)
            return None
        return loop.time() - started


def _worker_device(slot: Slot) -> str:
    """The ``device`` the worker loads onto: where it was placed, except that a model on a
    Ray node uses the GPU Ray gave it (``CUDA_VISIBLE_DEVICES``) or the recipe's setting."""
    recipe = slot.recipe
    if nodes.node_of(slot.placed_device) is not None:
        return "cuda" if recipe.resources.get("GPU") else recipe.device
    return slot.placed_device or recipe.device
