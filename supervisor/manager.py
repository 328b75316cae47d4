"""The one owner of every model slot: loads, leases, idle timers and the one retire path.

Requests get a worker only through :meth:`Manager.ensure_ready` (or the :meth:`Manager.use`
context manager around it). It decides inside the owner, with no ``await`` between looking at
a slot's state and acting on it, so N concurrent cold requests start exactly one load and the
rest join it. Every way a model leaves memory -- idle timer, LRU, memory budget, exclusive
group, manual unload, unload-all, ``keep_alive: 0``, crash, load-failure eviction, shutdown --
ends in :meth:`Manager.retire`, which cancels the idle timer first.

Room is made under a placement lock: plan (``policy.plan_admission``), retire the victims,
plan again, then reserve the target's cost. Spawning happens outside that lock, bounded by
``max_parallel_loads``, so two models can load at once when there is room for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import shutil
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor import policy, reload
from supervisor.admission import Admission
from supervisor.channel import Channel
from supervisor.config import Recipe, Settings, effective_preload
from supervisor.devices import DeviceProbe, Inventory
from supervisor.errors import (
    LemonadeError,
    ModelNotFound,
    ServiceUnavailable,
    TooManyRequests,
    WorkerFailed,
)
from supervisor.events import EventBus
from supervisor.lifecycle import IdleTimer, Slot, State
from supervisor.load_progress import ProgressBoard
from supervisor.process import WorkerProcess, worker_environment
from supervisor.rundir import create_runtime_dir
from supervisor.watching import Watcher
from supervisor.worker_start import WorkerStarter
from supervisor.zygote_pool import ZygotePool
from workers.protocol import ErrorCode

if TYPE_CHECKING:
    from supervisor.cluster.ray_backend import RayBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """What a request holds while it uses a model."""

    name: str
    recipe: Recipe
    channel: Channel
    pid: int


@dataclass(frozen=True)
class EffectiveTimeout:
    seconds: float  # math.inf = never; 0 = unload as soon as idle
    source: str


#: Every Manager alive in this process, so tests (the leak guard) and debugging tools can
#: audit them without being handed a reference.
LIVE_MANAGERS: weakref.WeakSet[Manager] = weakref.WeakSet()


class Manager:
    def __init__(self, settings: Settings, *, runtime_base: str | None = None,
                 probe: DeviceProbe | None = None) -> None:
        LIVE_MANAGERS.add(self)
        self.settings = settings
        self.events = EventBus()
        self.slots: dict[str, Slot] = {
            name: Slot(recipe=recipe, timer=IdleTimer(functools.partial(self.idle_expired, name)))
            for name, recipe in settings.models.items()
        }
        self.runtime_global_idle_timeout_s: float | None = None
        self.spawns = 0  # total worker processes started (tests and metrics read it)
        self.runtime_base = runtime_base
        self.runtime_dir: Path | None = None
        self._load_slots = asyncio.Semaphore(settings.max_parallel_loads)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self.zygotes: ZygotePool | None = None
        #: The GPUs and declared devices, their budgets and probe readings (devices.py).
        self.inventory = Inventory(settings, probe)
        #: The Ray cluster models run on, when ``cluster`` is set (supervisor/cluster/;
        #: imported only then, so the one-machine server never imports Ray).
        self.cluster: RayBackend | None = None
        self._cluster_refresh: asyncio.Task[None] | None = None
        #: Device choice, eviction planning and reservations (admission.py).
        self.admission: Admission
        if settings.cluster:
            from supervisor.cluster.admission import ClusterAdmission
            from supervisor.cluster.ray_backend import RayBackend

            self.cluster = RayBackend(settings)
            self.admission = ClusterAdmission(self, self.inventory, self.cluster)
        else:
            self.admission = Admission(self, self.inventory)
        self.memory_budget_bytes = self.admission.memory_budget_bytes
        #: Starting a worker process and loading the model into it (worker_start.py).
        self.starter = WorkerStarter(self)
        #: Crash and hang detection (watching.py).
        self.watcher = Watcher(self)
        #: Each load's progress while it runs: status shows it, it logs it at a readable rate.
        self.load_progress = ProgressBoard(self.events)
        #: Called as ``callback(model, waited_s)`` in the caller's task each time a request
        #: gets hold of a model, with how long it waited (for a load, a stop, a join). A
        #: callback, not an event: it fires on every request, and the events stream is about
        #: lifecycle changes. Metrics and the access log listen; the manager knows neither.
        self.on_admitted: list[Callable[[str, float], None]] = []

    # ================================================================ start / stop

    async def start(self) -> None:
        self.runtime_dir = create_runtime_dir(self.runtime_base)
        self._heartbeat = asyncio.create_task(self.watcher.heartbeat_loop(), name="heartbeat")
        if self.cluster is not None:
            # Workers run on the cluster's nodes, so no zygote here: nothing local to fork.
            self.cluster.connect()
            self._cluster_refresh = asyncio.create_task(self.cluster.refresh_loop(),
                                                        name="cluster-nodes")
            for name in effective_preload(self.settings):
                self.spawn_task(self._preload(name), f"preload-{name}")
            return
        self.zygotes = ZygotePool(self.settings.zygotes,
                                  worker_environment(data_dir=self.settings.data_dir),
                                  start_timeout_s=self.settings.handshake_timeout_s,
                                  idle_timeout_s=self.settings.zygote_idle_timeout_s,
                                  on_idle_exit=self._zygote_idle_exit)
        kinds = list(dict.fromkeys(r.kind for r in self.settings.models.values()))
        eager = self.zygotes.start_all(kinds)
        if eager is not None:
            self._tasks.add(eager)
            eager.add_done_callback(self._tasks.discard)
        for name in effective_preload(self.settings):
            self.spawn_task(self._preload(name), f"preload-{name}")

    def _zygote_idle_exit(self, **fields: Any) -> None:
        self.events.publish("zygote_stopped", None, reason="idle", **fields)

    def begin_shutdown(self) -> None:
        """The server is stopping: refuse new requests (503) and cancel loads in progress.

        Their waiters get a 503 at once and the loading workers are killed, so a SIGTERM
        during a long load does not wait for it. Requests already served finish; ``close()``
        then retires every model. Safe to call more than once.
        """
        self._closing = True
        for slot in self.slots.values():
            task = slot.load_task
            if slot.state is State.LOADING and task is not None and not task.done():
                task.cancel()

    async def close(self) -> None:
        """Retire every model (reason ``shutdown``) and remove the runtime dir."""
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await asyncio.gather(
            *(self.retire(s, "shutdown", force=True) for s in self.slots.values()),
            return_exceptions=True,
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._heartbeat is not None:
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.zygotes is not None:
            # Only after every worker is gone: a zygote's exit kills the workers it forked.
            await self.zygotes.close()
        if self._cluster_refresh is not None:
            self._cluster_refresh.cancel()
            await asyncio.gather(self._cluster_refresh, return_exceptions=True)
        if self.cluster is not None:
            self.cluster.close()
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)  # strong reference until done
        task.add_done_callback(self._tasks.discard)
        return task

    async def _preload(self, name: str) -> None:
        try:
            await self.load(name)
        except LemonadeError as e:
            log.error("preloading %s failed: %s", name, e.message)

    # ================================================================ lookups

    def slot(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None or slot.removed:
            known = ", ".join(sorted(n for n, s in self.slots.items() if not s.removed))
            removed = " (it was removed by a config reload)" if slot is not None else ""
            raise ModelNotFound(
                f"model '{name}' is not configured{removed}; configured models: "
                f"{known or 'none'}"
            )
        return slot

    def effective_idle_timeout(self, slot: Slot) -> EffectiveTimeout:
        """DESIGN.md "Idle timeout": request > runtime > recipe > global."""
        if slot.request_idle_timeout_s is not None:
            return EffectiveTimeout(slot.request_idle_timeout_s, "request")
        if slot.runtime_idle_timeout_s is not None:
            return EffectiveTimeout(slot.runtime_idle_timeout_s, "runtime")
        if self.runtime_global_idle_timeout_s is not None:
            return EffectiveTimeout(self.runtime_global_idle_timeout_s, "runtime (global)")
        if slot.recipe.idle_timeout_s is not None:
            return EffectiveTimeout(slot.recipe.idle_timeout_s, f"recipe ({slot.recipe.source})")
        where = self.settings.sources.get("auto_unload_timer_s", "default")
        return EffectiveTimeout(self.settings.auto_unload_timer_s, f"global ({where})")

    # ================================================================ requests

    @contextlib.asynccontextmanager
    async def use(self, name: str, *, keep_alive_s: float | None = None) -> AsyncIterator[Lease]:
        """Hold ``name`` loaded for the duration of the block."""
        slot = await self.ensure_ready(name, keep_alive_s=keep_alive_s)
        try:
            assert slot.channel is not None and slot.worker is not None
            yield Lease(name, slot.recipe, slot.channel, slot.worker.pid)
        finally:
            self.release(slot)

    async def ensure_ready(
        self, name: str, *, keep_alive_s: float | None = None, limited: bool = True
    ) -> Slot:
        """Return the slot READY with ``in_flight`` already counted for the caller.

        ``limited``: apply the recipe's ``max_queue`` (requests beyond ``max_concurrency``
        that may wait; one more is a 429 with Retry-After). Admin loads are not limited.
        """
        slot = self.slot(name)
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        max_queue = slot.recipe.max_queue
        if limited and max_queue is not None and not self._closing:
            held = slot.in_flight + slot.waiters
            if held >= slot.recipe.max_concurrency + max_queue:
                raise TooManyRequests(
                    f"model '{name}' already has {held} request(s) running or waiting "
                    f"(max_concurrency {slot.recipe.max_concurrency} + max_queue {max_queue})",
                    retry_after_s=1,
                )
        if limited and self.settings.max_waiting is not None and not self._closing:
            self._check_global_queue(slot)
        while True:
            if self._closing:
                raise ServiceUnavailable("the server is shutting down", retry_after_s=5)
            if slot.removed:
                self.slot(name)  # raises: a reload removed it while this request waited
            state = slot.state
            if state is State.READY:
                for callback in self.on_admitted:  # before anything is held: one may raise
                    callback(name, loop.time() - asked_at)
                slot.in_flight += 1
                slot.idle.clear()
                slot.timer.cancel()
                slot.touch(loop.time())
                if keep_alive_s is not None:
                    slot.request_idle_timeout_s = keep_alive_s
                return slot
            if state is State.FAILED:
                remaining = slot.cooldown_remaining(loop.time())
                if remaining > 0:
                    raise ServiceUnavailable(
                        f"model '{name}' failed to load ({slot.last_error}); "
                        f"next attempt allowed in {math.ceil(remaining)}s",
                        code="model_load_failed",
                        retry_after_s=remaining,
                    )
            if state in (State.UNLOADED, State.FAILED):
                self._begin_load(slot)
            if slot.state is State.LOADING:
                assert slot.load_future is not None
                slot.waiters += 1
                try:
                    await asyncio.shield(slot.load_future)
                finally:
                    slot.waiters -= 1
                continue
            if slot.state is State.STOPPING:
                assert slot.stop_task is not None
                with contextlib.suppress(Exception):
                    await asyncio.shield(slot.stop_task)
                continue

    @property
    def heartbeat_task(self) -> asyncio.Task[None] | None:
        return self._heartbeat

    def waiting_requests(self) -> int:
        """Requests waiting anywhere: for a load or a stop, or for a free slot in a worker."""
        return sum(s.waiters + max(0, s.in_flight - s.recipe.max_concurrency)
                   for s in self.slots.values())

    def _check_global_queue(self, slot: Slot) -> None:
        """``max_waiting``: a request that would wait, beyond the cap, is a 503 now."""
        would_wait = (slot.state is not State.READY
                      or slot.in_flight >= slot.recipe.max_concurrency)
        cap = self.settings.max_waiting
        if would_wait and cap is not None and self.waiting_requests() >= cap:
            raise ServiceUnavailable(
                f"{self.waiting_requests()} requests are already waiting across all models "
                f"(max_waiting {cap}); try again shortly",
                code="server_queue_full", retry_after_s=1)

    def release(self, slot: Slot) -> None:
        slot.in_flight -= 1
        assert slot.in_flight >= 0, f"in_flight of {slot.name} went negative"
        slot.touch(asyncio.get_running_loop().time())
        if slot.in_flight == 0:
            slot.idle.set()
            self.became_idle(slot)

    def became_idle(self, slot: Slot) -> None:
        """Arm the idle timer (or retire at once for ``keep_alive: 0``) when nobody holds it."""
        if slot.state is not State.READY or slot.in_flight or slot.waiters or self._closing:
            return
        if slot.removed or slot.pending_recipe is not None:  # a config reload asked for it
            reason = "removed" if slot.removed else "reload"
            self.spawn_task(self.retire_quietly(slot, reason), f"retire-{slot.name}")
            return
        timeout = self.effective_idle_timeout(slot)
        if slot.pinned or math.isinf(timeout.seconds):
            slot.timer.cancel()
            return
        if timeout.seconds <= 0:
            self.spawn_task(self.retire_quietly(slot, "keep_alive_0"), f"retire-{slot.name}")
            return
        slot.timer.arm(timeout.seconds)

    def idle_expired(self, name: str, generation: int) -> None:
        slot = self.slots[name]
        if generation != slot.timer.generation:
            return  # cancelled or re-armed after this timer was scheduled
        slot.timer.cancel()
        if slot.state is State.READY and not slot.busy:
            self.spawn_task(self.retire_quietly(slot, "idle"), f"retire-{name}")

    async def retire_quietly(self, slot: Slot, reason: str, *, force: bool = False) -> None:
        try:
            await self.retire(slot, reason, force=force)
        except LemonadeError as e:
            log.info("did not unload %s (%s): %s", slot.name, reason, e.message)

    # ================================================================ admin operations

    async def load(
        self, name: str, *, pinned: bool | None = None, idle_timeout_s: float | None = None
    ) -> Slot:
        """Load (or keep) a model without holding it; the idle timer starts right away."""
        slot = self.slot(name)
        if pinned is not None:
            slot.pinned_override = pinned
        if idle_timeout_s is not None:
            slot.runtime_idle_timeout_s = idle_timeout_s
        slot = await self.ensure_ready(name, limited=False)
        self.release(slot)
        return slot

    async def unload(self, name: str, *, force: bool = False) -> bool:
        """Manual unload; returns whether a process was running."""
        slot = self.slot(name)
        was_loaded = slot.state in (State.LOADING, State.READY, State.STOPPING)
        await self.retire(slot, "manual", force=force)
        return was_loaded

    async def unload_all(self, *, force: bool = False) -> list[str]:
        targets = [
            s for s in self.slots.values()
            if s.state in (State.LOADING, State.READY, State.STOPPING)
        ]
        results = await asyncio.gather(
            *(self.retire(s, "unload_all", force=force) for s in targets), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [s.name for s in targets]

    def set_idle_timeout(self, name: str | None, seconds: float) -> None:
        """``POST /api/v1/timeout``: per model, or global when ``name`` is None."""
        if name is None:
            self.runtime_global_idle_timeout_s = seconds
            slots: Iterable[Slot] = self.slots.values()
        else:
            slots = [self.slot(name)]
            slots[0].runtime_idle_timeout_s = seconds
        for slot in slots:
            slot.request_idle_timeout_s = None  # the newer instruction wins
            if slot.state is State.READY and not slot.busy:
                self.became_idle(slot)

    # ================================================================ retire: the one path

    async def retire(self, slot: Slot, reason: str, *, force: bool = False) -> None:
        """End ``slot``'s worker. Every unload path comes here.

        Cancels the idle timer, marks STOPPING (new requests wait, then reload), drains the
        requests in flight (bounded by ``drain_timeout_s``; ``force`` skips the wait), sends
        ``shutdown``, waits ``stop_grace_s``, kills the process group, reaps, releases the
        reservation and records ``last_eviction``.
        """
        slot.timer.cancel()
        if slot.state is State.LOADING:
            await self._cancel_load(slot, reason)
            return
        if slot.state is State.STOPPING:
            assert slot.stop_task is not None
            await asyncio.shield(slot.stop_task)
            return
        if slot.state is not State.READY:
            return
        slot.transition(State.STOPPING)
        slot.stop_task = asyncio.ensure_future(self._stop(slot, reason, force))
        await asyncio.shield(slot.stop_task)

    async def _stop(self, slot: Slot, reason: str, force: bool) -> None:
        if not force and slot.in_flight:
            log.info("draining %d request(s) of %s before unloading (%s)",
                     slot.in_flight, slot.name, reason)
            try:
                await asyncio.wait_for(slot.idle.wait(), self.settings.drain_timeout_s)
            except TimeoutError:
                # Never cut a request off: the model stays, the eviction fails.
                slot.transition(State.READY)
                slot.stop_task = None
                raise ServiceUnavailable(
                    f"model '{slot.name}' is still busy with {slot.in_flight} request(s) after "
                    f"{self.settings.drain_timeout_s:g}s; it was not unloaded",
                    code="model_busy",
                    retry_after_s=5,
                ) from None
        worker: WorkerProcess = slot.worker
        pid = worker.pid
        try:
            if slot.channel is not None:
                await slot.channel.send_shutdown()
            await asyncio.shield(worker.stop(self.settings.stop_grace_s))
        finally:
            self.forget_process(slot)
            slot.last_eviction = {"reason": reason, "at": time.time()}
            slot.transition(State.UNLOADED)
            log.info("worker %d for %s unloaded (%s)", pid, slot.name, reason)
            self.events.publish("unloaded", slot.name, pid=pid, reason=reason)
            self._after_unload(slot)

    def _after_unload(self, slot: Slot) -> None:
        """What a config reload left for this moment: a new recipe, or the slot's removal."""
        if slot.pending_recipe is not None:
            reload.switch_recipe(slot, slot.pending_recipe)
        if slot.removed and self.slots.get(slot.name) is slot:
            del self.slots[slot.name]

    def forget_process(self, slot: Slot) -> None:
        if slot.channel is not None:
            slot.channel.close()
        if (slot.worker is not None and slot.placed_device is not None
                and slot.placed_device != policy.CPU):
            self.inventory.worker_left(slot.placed_device, int(slot.worker.pid), slot.vram_bytes)
        slot.channel = None
        slot.worker = None
        slot.admitted = False
        slot.reserved_bytes = 0
        slot.reserved_device_bytes = {}
        slot.placed_device = None
        slot.rss_bytes = slot.vram_bytes = 0
        slot.request_idle_timeout_s = None
        slot.device = None

    async def _cancel_load(self, slot: Slot, reason: str) -> None:
        task = slot.load_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        slot.last_eviction = {"reason": reason, "at": time.time()}

    # ================================================================ loading

    def _begin_load(self, slot: Slot) -> None:
        """Synchronous: from here on every other request joins this one load."""
        slot.transition(State.LOADING)
        slot.load_future = asyncio.get_running_loop().create_future()
        slot.load_future.add_done_callback(_consume_exception)
        slot.load_task = self.spawn_task(self._load(slot), f"load-{slot.name}")
        self.load_progress.begin(slot.name, slot.recipe.kind, slot.load_task)

    async def _load(self, slot: Slot) -> None:
        assert slot.load_future is not None
        future = slot.load_future
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.events.publish("loading", slot.name)
        try:
            async with self._load_slots:
                try:
                    await self.admission.admit(
                        slot, deadline=started + self.settings.admission_timeout_s)
                except LemonadeError as e:
                    # No room (409/503): not the model's fault, so no failure and no cooldown.
                    self.forget_process(slot)
                    slot.transition(State.UNLOADED)
                    self.events.publish("load_refused", slot.name, error=e.message)
                    future.set_exception(e)
                    return
                try:
                    await self._spawn_and_load(slot)
                except LemonadeError as e:
                    if not _worth_retrying(e):
                        raise
                    log.warning("loading %s failed (%s); unloading every idle model and "
                                "retrying once", slot.name, e.message)
                    await self._evict_all_idle(except_for=slot)
                    await self._spawn_and_load(slot)
        except asyncio.CancelledError:
            self.forget_process(slot)
            slot.transition(State.UNLOADED)
            future.set_exception(ServiceUnavailable(
                f"loading model '{slot.name}' was cancelled", retry_after_s=1))
            raise
        except Exception as e:
            if not isinstance(e, LemonadeError):
                # A bug must still end the load: waiters get an answer, the slot a state.
                log.exception("loading %s failed with an unexpected error (this is a bug)",
                              slot.name)
                e = WorkerFailed(f"internal error while loading: {type(e).__name__}: {e}")
            self.forget_process(slot)
            self._record_failure(slot, e)
            self.events.publish("load_failed", slot.name, error=e.message, status=e.status)
            future.set_exception(e)
            return
        slot.failures = 0
        slot.last_error = None
        slot.load_seconds = loop.time() - started
        slot.loaded_at_mono = loop.time()
        slot.loaded_at = time.time()
        slot.touch(loop.time())
        slot.transition(State.READY)
        log.info("worker %d for %s ready in %.2fs (rss %d MiB)", slot.pid, slot.name,
                 slot.load_seconds, slot.rss_bytes // 2**20)
        self.events.publish("loaded", slot.name, pid=slot.pid, load_seconds=slot.load_seconds,
                            rss_bytes=slot.rss_bytes, vram_bytes=slot.vram_bytes)
        future.set_result(None)
        self.became_idle(slot)

    def _record_failure(self, slot: Slot, error: LemonadeError) -> None:
        slot.failures += 1
        base = self.settings.load_failure_cooldown_s
        cooldown = min(base * 2 ** (slot.failures - 1), self.settings.load_failure_cooldown_max_s)
        now = asyncio.get_running_loop().time()
        slot.cooldown_until_mono = now + cooldown
        slot.last_error = error.message
        error.message = f"model '{slot.name}' failed to load: {error.message}"
        slot.transition(State.FAILED)
        # What the waiting requests see: 503 with the cooldown as Retry-After; a worker that
        # ran out of memory says so (retryable once memory frees up), any other failure is
        # ``model_load_failed``. A load that timed out stays a 504.
        if error.status != 504:
            error.status = ServiceUnavailable.status
            error.retry_after_s = cooldown
            if error.worker_code == ErrorCode.OUT_OF_MEMORY:
                error.code = "insufficient_memory"
            elif error.code not in ("spawn_failed",):
                error.code = "model_load_failed"
        log.error("loading %s failed (%d in a row; next try in %gs): %s",
                  slot.name, slot.failures, cooldown, error.message)

    async def _evict_all_idle(self, *, except_for: Slot) -> None:
        victims = [
            s for s in self.slots.values()
            if s is not except_for and s.state is State.READY and not s.busy and not s.pinned
        ]
        await asyncio.gather(
            *(self.retire(v, "load_failure_evict_all") for v in victims), return_exceptions=True
        )

    async def _spawn_and_load(self, slot: Slot) -> None:
        self.spawns += 1
        worker = await self.starter.start(slot)
        self.spawn_task(self.watcher.watch_exit(slot, worker),
                         f"watch-{slot.name}-{worker.pid}")

    # ================================================================ invariants

    @property
    def closed(self) -> bool:
        return self._closing

    def _tasks_running(self) -> bool:
        """Whether a background task (retire, load, ping, exit watcher of a live worker) runs."""
        return any(not t.done() and not t.get_name().startswith("watch-") for t in self._tasks)

    def audit(self) -> list[str]:
        """The bookkeeping invariants (reliability matrix, leak guard); returns what is broken.

        Meant to hold whenever the event loop is between steps: timers only on idle ready
        models, no process behind an unloaded slot, counters never negative, a memory
        reservation held only by an admitted, resident model, and after ``close()``
        nothing loaded, nothing in flight, no task left.
        """
        problems: list[str] = []
        for slot in self.slots.values():
            name = slot.name
            if slot.in_flight < 0 or slot.waiters < 0:
                problems.append(f"{name}: negative counters in_flight={slot.in_flight} "
                                f"waiters={slot.waiters}")
            if slot.timer.armed and (slot.state is not State.READY or slot.busy):
                problems.append(f"{name}: idle timer armed while {slot.state.value}"
                                f"{' and busy' if slot.busy else ''}")
            if slot.state in (State.UNLOADED, State.FAILED):
                if slot.worker is not None or slot.channel is not None:
                    problems.append(f"{name}: {slot.state.value} but a worker is attached")
                if slot.admitted or slot.reserved_bytes:
                    problems.append(f"{name}: {slot.state.value} but still holds a reservation "
                                    f"of {slot.reserved_bytes} bytes")
            if slot.state is State.READY and (slot.worker is None or slot.channel is None):
                problems.append(f"{name}: ready without a worker")
            if not slot.admitted and slot.reserved_bytes:
                problems.append(f"{name}: reserved {slot.reserved_bytes} bytes without admission")
            if self._closing:
                if slot.state not in (State.UNLOADED, State.FAILED):
                    problems.append(f"{name}: {slot.state.value} after close()")
                if slot.in_flight or slot.waiters:
                    problems.append(f"{name}: in_flight={slot.in_flight} "
                                    f"waiters={slot.waiters} after close()")
                if slot.timer.armed:
                    problems.append(f"{name}: idle timer armed after close()")
        if self._closing and any(not t.done() for t in self._tasks):
            problems.append("tasks still running after close(): "
                            + ", ".join(t.get_name() for t in self._tasks if not t.done()))
        return problems

    # ================================================================ status

    def budget_for_models(self) -> int | None:
        """The CPU budget less what the zygotes hold: models get what is left."""
        return self.admission.budget_for_models()

    def worker_pids(self) -> list[int]:
        """This machine's worker pids (a worker on a cluster node has another machine's)."""
        return [int(s.worker.pid) for s in self.slots.values()
                if s.worker is not None and not s.worker.remote]

    def refresh_memory(self) -> None:
        vram = self.inventory.refresh(self.worker_pids()) if self.inventory.devices else {}
        for slot in self.slots.values():
            if slot.worker is not None and slot.state in (State.READY, State.STOPPING):
                slot.rss_bytes = slot.worker.rss_bytes()
                if slot.worker.pid in vram:
                    slot.vram_bytes = vram[slot.worker.pid]


# ==================================================================== helpers


def _consume_exception(future: asyncio.Future[None]) -> None:
    # A load nobody waited for (preload) must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _worth_retrying(error: LemonadeError) -> bool:
    """Lemonade's "nuclear option" applies to real load failures, not to recipe mistakes."""
    if error.worker_code is not None:
        return error.worker_code in (ErrorCode.LOAD_FAILED, ErrorCode.OUT_OF_MEMORY)
    return isinstance(error, WorkerFailed)
