"""One model's slot: its state, the only legal moves between states, and its idle timer.

States: ``UNLOADED -> LOADING -> READY -> STOPPING -> UNLOADED``, plus ``FAILED`` (the load
failed; a cooldown runs before the next try). "Busy" is not a state: it is ``in_flight > 0``.
Every state change goes through :meth:`Slot.transition`, which raises on an illegal move and
names both states, so a logic error shows up as a clear exception rather than a stuck model.

The idle timer is a ``loop.call_later`` handle stamped with a generation. Firing only posts
``(slot, generation)`` to the manager, which re-checks that the generation is still current
and the model still idle before retiring it; cancelling bumps the generation, so a timer that
already fired but whose callback has not run yet is harmless.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.config import Recipe


class State(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


_LEGAL: dict[State, frozenset[State]] = {
    State.UNLOADED: frozenset({State.LOADING}),
    # LOADING -> UNLOADED: the planner refused room (nothing was spawned) or shutdown cancelled it.
    State.LOADING: frozenset({State.READY, State.FAILED, State.UNLOADED}),
    State.READY: frozenset({State.STOPPING}),
    # STOPPING -> READY: a drain for an eviction ran out of time, so the victim stays.
    State.STOPPING: frozenset({State.UNLOADED, State.READY}),
    State.FAILED: frozenset({State.LOADING, State.UNLOADED}),
}


class IllegalTransition(RuntimeError):
    pass


class IdleTimer:
    """A generation-stamped ``call_later``: the callback gets the generation it was armed with."""

    def __init__(self, on_expired: Callable[[int], None]) -> None:
        self._on_expired = on_expired
        self._handle: asyncio.TimerHandle | None = None
        self.generation = 0
        self.expires_at: float | None = None  # wall clock, for status

    def arm(self, delay_s: float) -> None:
        self.cancel()
        generation = self.generation
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(delay_s, self._on_expired, generation)
        self.expires_at = time.time() + delay_s

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.generation += 1
        self.expires_at = None

    @property
    def armed(self) -> bool:
        return self._handle is not None


@dataclass(eq=False)
class Slot:
    """Everything the manager knows about one configured model."""

    recipe: Recipe
    timer: IdleTimer
    state: State = State.UNLOADED
    worker: Any = None  # supervisor.process.WorkerProcess while a process exists
    channel: Any = None  # supervisor.channel.Channel while connected
    in_flight: int = 0
    waiters: int = 0  # requests waiting for a load in progress
    admitted: bool = False  # the planner made room; ``reserved_bytes`` is held
    reserved_bytes: int = 0
    #: What the reservation holds on devices other than the CPU ({"cuda:0": bytes}).
    reserved_device_bytes: dict[str, int] = field(default_factory=dict)
    #: A config reload changed the recipe while the model was loaded: used from the next load.
    pending_recipe: Recipe | None = None
    #: A config reload removed the model: new requests get 404; dropped once unloaded.
    removed: bool = False
    #: The device admission chose (None: none chosen, no GPU known); kept until unload.
    placed_device: str | None = None
    load_future: asyncio.Future[None] | None = None  # what requests joining the load await
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    spawn_seq: int = 0
    device: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rss_bytes: int = 0
    vram_bytes: int = 0
    measured_cost_bytes: int | None = None  # footprint of the last successful load
    # The last load on a GPU: its RAM, the device, and its VRAM there (placement.charges).
    measured_ram_bytes: int | None = None
    measured_device: str | None = None
    measured_device_bytes: int | None = None
    loaded_at_mono: float = 0.0
    loaded_at: float | None = None  # wall clock
    load_seconds: float | None = None
    last_used_mono: float = 0.0
    last_used: float | None = None
    # Idle-timeout overrides above the recipe (DESIGN.md "Idle timeout"): seconds; inf = never.
    request_idle_timeout_s: float | None = None
    runtime_idle_timeout_s: float | None = None
    pinned_override: bool | None = None
    last_eviction: dict[str, Any] | None = None
    restarts: int = 0
    failures: int = 0
    cooldown_until_mono: float = 0.0
    last_error: str | None = None
    #: When the slot entered its current state (monotonic clock), for the liveness check.
    state_since_mono: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def pinned(self) -> bool:
        return self.recipe.pinned if self.pinned_override is None else self.pinned_override

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiters > 0

    @property
    def pid(self) -> int | None:
        return None if self.worker is None else int(self.worker.pid)

    def transition(self, new: State) -> None:
        if new not in _LEGAL[self.state]:
            raise IllegalTransition(
                f"model '{self.name}': cannot go from {self.state.value} to {new.value}"
            )
        self.state = new
        self.state_since_mono = time.monotonic()

    def touch(self, now_mono: float) -> None:
        self.last_used_mono = now_mono
        self.last_used = time.time()

    def cost_bytes(self) -> int:
        """What this model is expected to occupy: measured if it loaded before, else estimated."""
        if self.measured_cost_bytes is not None:
            return self.measured_cost_bytes
        return self.recipe.memory_bytes or 0

    def cooldown_remaining(self, now_mono: float) -> float:
        return max(0.0, self.cooldown_until_mono - now_mono)


def is_never(seconds: float | None) -> bool:
    return seconds is None or math.isinf(seconds)
