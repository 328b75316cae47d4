"""Lifecycle events (loading, loaded, unloaded, crashed, ...) fanned out to whoever listens.

The manager publishes; the metrics module listens synchronously, and each ``GET
/api/v1/events`` client gets a bounded queue. A client that cannot keep up loses the oldest
events (and is told how many) instead of growing the server's memory.

The bus also keeps the last :data:`HISTORY_SIZE` events but ``progress`` ones (loads,
unloads and their reasons, crashes, ...) so that a client that connects late, such as the
dashboard opened after the fact, can show what happened before it was listening
(``recent_events`` in ``GET /api/v1/status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

Event = dict[str, Any]

_QUEUE_SIZE = 256
#: How many past events :meth:`EventBus.recent` keeps.
HISTORY_SIZE = 100
#: Too frequent to be history: a load reports progress many times a second.
_NOT_HISTORY = frozenset({"progress"})


class EventBus:
    def __init__(self) -> None:
        self._listeners: list[Callable[[Event], None]] = []
        #: Each subscriber's queue and how many events it lost since it was last told.
        self._queues: dict[asyncio.Queue[Event], int] = {}
        self.published = 0
        self._history: deque[Event] = deque(maxlen=HISTORY_SIZE)

    def listen(self, callback: Callable[[Event], None]) -> None:
        self._listeners.append(callback)

    def publish(self, kind: str, model: str | None, /, **fields: Any) -> Event:
        """``model`` is None for events about the server rather than a model (a zygote's
        ``zygote_stopped`` carries its ``kind`` instead)."""
        event: Event = {"event": kind, "model": model, "at": time.time(), **fields}
        self.published += 1
        if kind not in _NOT_HISTORY:
            self._history.append(event)
        for callback in self._listeners:
            callback(event)
        for queue in self._queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # a slow reader loses the oldest event, not the newest
                    self._queues[queue] += 1
            queue.put_nowait(event)
        return event

    def recent(self) -> list[Event]:
        """The last events but ``progress`` ones, oldest first."""
        return list(self._history)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=_QUEUE_SIZE)
        self._queues[queue] = 0
        try:
            yield queue
        finally:
            self._queues.pop(queue, None)

    def take_dropped(self, queue: asyncio.Queue[Event]) -> int:
        """Events ``queue``'s subscriber lost since the last call (and reset the count)."""
        dropped = self._queues.get(queue, 0)
        if dropped:
            self._queues[queue] = 0
        return dropped
