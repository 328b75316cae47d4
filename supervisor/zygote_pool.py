"""The zygotes of one supervisor: which run, when they start and end, and when to spawn.

One zygote per worker kind (:class:`supervisor.zygote.Zygote`): ``zygotes = "eager"`` starts
every configured kind's with the server, ``"lazy"`` starts one on the kind's first load.
Concurrent loads of a kind share one start.

Whenever forking is not possible the pool says so once in the log and returns ``None``, and
the caller spawns the worker plainly: no pidfd support (Linux < 5.3), a zygote that cannot
import its modules, one that reports its imports made forking unsafe, or one that keeps
dying (three failed starts in a row switch its kind to spawning for good).

A zygote that has had no live worker for ``idle_timeout_s`` is stopped, so the memory of its
imports comes back after everything has unloaded. That is an expected end: it is not a
failed start, eager mode does not restart it, and the next load of the kind starts a new
one. ``on_idle_exit`` (a callback, so the pool needs no event bus) hears of each such stop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from supervisor.units import format_bytes, format_duration
from supervisor.zygote import ForkedWorker, Zygote, fork_unavailable_reason

log = logging.getLogger(__name__)

#: Failed starts in a row after which a kind's workers are always spawned plainly (a zygote
#: that dies within SHORT_LIFE_S of being ready counts as a failed start).
MAX_START_FAILURES = 3
SHORT_LIFE_S = 30.0
#: Eager mode restarts a zygote that died after this pause.
RESTART_DELAY_S = 1.0

#: ``on_idle_exit(kind=..., pid=..., idle_seconds=..., freed_bytes=...)``
IdleExitCallback = Callable[..., None]


class ZygotePool:
    """The zygotes of one supervisor, one per kind, started on demand or at start."""

    def __init__(self, mode: str, env: dict[str, str], start_timeout_s: float, *,
                 idle_timeout_s: float = math.inf,
                 on_idle_exit: IdleExitCallback | None = None) -> None:
        self.mode = mode
        self._env = env
        self._start_timeout_s = start_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._on_idle_exit = on_idle_exit
        self._zygotes: dict[str, Zygote] = {}
        self._starting: dict[str, asyncio.Task[Zygote | None]] = {}
        self._failures: collections.Counter[str] = collections.Counter()
        #: Kinds whose zygote reported its imports make forking unsafe (that does not change
        #: while the server runs, so a zygote that ended is not started again to learn it).
        self._unsafe: dict[str, str] = {}
        #: Kinds whose zygote was restarted once because its learned imports made it unsafe.
        self._retried_clean: set[str] = set()
        self._said: set[tuple[str, str]] = set()
        self._restarts: set[asyncio.Task[Zygote | None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False
        self.unavailable = None if mode == "off" else fork_unavailable_reason()
        if self.unavailable is not None:
            log.warning("workers will be spawned, not forked: %s", self.unavailable)

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.unavailable is None and not self._closed

    def start_all(self, kinds: list[str]) -> asyncio.Task[None] | None:
        """Eager mode: start the zygotes of ``kinds`` one after another, in the background."""
        if not self.enabled or self.mode != "eager" or not kinds:
            return None

        async def start_in_turn() -> None:
            for kind in kinds:
                await self._zygote_for(kind)

        return asyncio.create_task(start_in_turn(), name="zygotes")

    async def fork(self, kind: str, socket_path: str, max_threads: int) -> ForkedWorker | None:
        """A forked worker, or None when the caller should spawn one (logged once)."""
        if not self.enabled:
            return None
        # Twice at most: a zygote whose idle exit came between finding it and asking it to
        # fork (only when the loop stalls past its timeout) is replaced by a new one.
        for _ in range(2):
            zygote = await self._usable_zygote(kind)
            if zygote is None:
                return None
            outcome = await zygote.fork(socket_path, max_threads)
            if not (isinstance(outcome, str) and zygote.idle_exited):
                break
        if isinstance(outcome, str):
            log.warning("could not fork a worker of kind %s (%s); spawning one instead",
                        kind, outcome)
            return None
        return outcome

    async def _usable_zygote(self, kind: str) -> Zygote | None:
        if kind not in self._unsafe:
            zygote = await self._zygote_for(kind)
            if zygote is not None and zygote.tainted and kind not in self._retried_clean:
                # Its learned imports made it unsafe and were set aside: a new zygote
                # starts without them (once; a second unsafe one means spawning from now).
                self._retried_clean.add(kind)
                log.warning("restarting the zygote for kind %s without its learned imports "
                            "(%s)", kind, zygote.unsafe)
                self._zygotes.pop(kind, None)
                await zygote.stop()
                zygote = await self._zygote_for(kind)
            if zygote is None or zygote.unsafe is None:
                return zygote
            self._unsafe[kind] = zygote.unsafe
        self._say_once(kind, "unsafe", f"workers of kind {kind} will be spawned, not forked: "
                                       f"{self._unsafe[kind]}")
        return None

    async def _zygote_for(self, kind: str) -> Zygote | None:
        zygote = self._zygotes.get(kind)
        if zygote is not None and zygote.alive:
            return zygote
        if self._failures[kind] >= MAX_START_FAILURES:
            return None
        task = self._starting.get(kind)
        if task is None:  # single-flight: concurrent loads of one kind share one start
            task = asyncio.ensure_future(self._start(kind))
            self._starting[kind] = task
            task.add_done_callback(lambda _t: self._starting.pop(kind, None))
        return await asyncio.shield(task)

    async def _start(self, kind: str) -> Zygote | None:
        previous = self._zygotes.pop(kind, None)
        if previous is not None:
            log.info("restarting the zygote for kind %s", kind)
            await previous.stop()
        zygote = Zygote(kind, self._env, on_lost=self._lost,
                        idle_timeout_s=self.idle_timeout_s, on_idle=self._idle)
        try:
            await zygote.start(self._start_timeout_s)
        except (OSError, RuntimeError) as e:
            self._failures[kind] += 1
            final = self._failures[kind] >= MAX_START_FAILURES
            log.warning("zygote for kind %s did not start (%s); spawning this worker%s", kind,
                        e, " and every later one of this kind" if final else "")
            return None
        if self._closed:
            await zygote.stop()
            return None
        self._zygotes[kind] = zygote
        log.info("zygote %d for kind %s ready (imports took %.2fs)", zygote.pid, kind,
                 zygote.import_s or 0.0)
        return zygote

    def _lost(self, zygote: Zygote) -> None:
        """A ready zygote died: a quick death counts as a failed start; eager restarts it."""
        lived = time.time() - (zygote.started_at or 0.0)
        if lived < SHORT_LIFE_S:
            self._failures[zygote.kind] += 1
        else:
            self._failures[zygote.kind] = 0
        if self._closed or self.mode != "eager":
            return  # lazy: the next load of the kind starts a new one

        async def restart() -> Zygote | None:
            await asyncio.sleep(RESTART_DELAY_S)
            return await self._zygote_for(zygote.kind)

        task = asyncio.ensure_future(restart())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    def _idle(self, zygote: Zygote, idle_s: float) -> None:
        """``zygote`` had no worker for its idle timeout: stop it (an expected end)."""
        if self._zygotes.get(zygote.kind) is not zygote or self._closed:
            return
        del self._zygotes[zygote.kind]  # off the books (and the budget) from now on
        freed = zygote.unique_bytes()
        log.info("zygote %s for kind %s had no worker for %s; stopping it (frees about %s)",
                 zygote.pid, zygote.kind, format_duration(round(idle_s, 1)),
                 format_bytes(freed or None))
        task = asyncio.ensure_future(zygote.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        if self._on_idle_exit is not None:
            self._on_idle_exit(kind=zygote.kind, pid=zygote.pid,
                               idle_seconds=round(idle_s, 3), freed_bytes=freed)

    def _say_once(self, kind: str, topic: str, text: str) -> None:
        if (kind, topic) not in self._said:
            self._said.add((kind, topic))
            log.warning("%s", text)

    def learn(self, kind: str) -> None:
        """A forked worker of ``kind`` has loaded: its zygote imports what the load used."""
        zygote = self._zygotes.get(kind)
        if zygote is not None:
            zygote.learn()

    def describe(self) -> list[dict[str, Any]]:
        return [z.describe() for z in self._zygotes.values()]

    def held_bytes(self) -> int:
        """Memory the running zygotes hold (their RSS: the pages their workers share)."""
        return sum(z.rss_bytes() for z in self._zygotes.values())

    async def close(self) -> None:
        """Stop every zygote (after the workers: a zygote's exit would kill its workers)."""
        self._closed = True
        pending = [*self._starting.values(), *self._restarts]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(z.stop() for z in self._zygotes.values()), *self._stopping,
                             return_exceptions=True)
        self._zygotes.clear()
