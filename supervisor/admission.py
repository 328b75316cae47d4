"""Making room for a model: choose its device, plan evictions, retire victims, reserve its cost.

Split out of the manager, which stays the one owner of the slots and of ``retire``: this
module decides *where* a model goes and *who* must leave for it, under the manager's
placement lock, and calls back into ``Manager.retire`` for every victim.

For each candidate device (``placement.candidate_devices``: the recipe's own device, or for
``device = "auto"`` every GPU and then the CPU) the pure planner is asked with every device's
budget at once; ``placement.choose`` picks among the answers. A refusal that waiting can cure
(a blocker loading or stopping) waits and plans again, up to the load's deadline; any other
refusal is the request's 409/503. Once a GPU is chosen, the load first waits (bounded) for a
worker that just left that GPU to have really given its memory back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from supervisor import policy
from supervisor.devices import Inventory
from supervisor.errors import Conflict, ServiceUnavailable
from supervisor.lifecycle import Slot, State
from supervisor.placement import (
    Candidate,
    candidate_devices,
    charges,
    choose,
    limits,
    residents,
    resolve_budget,
    target_of,
)

if TYPE_CHECKING:
    from supervisor.manager import Manager

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, manager: Manager, inventory: Inventory) -> None:
        self.manager = manager
        self.inventory = inventory
        self.memory_budget_bytes = resolve_budget(manager.settings.memory_budget)
        self.lock = asyncio.Lock()

    def budget_for_models(self) -> int | None:
        """The CPU budget less what the zygotes hold: models get what is left."""
        if self.memory_budget_bytes is None:
            return None
        zygotes = self.manager.zygotes
        held = zygotes.held_bytes() if zygotes is not None else 0
        return max(0, self.memory_budget_bytes - held)

    def limits(self) -> policy.Limits:
        return limits(self.manager.settings, self.budget_for_models(), self.inventory.budgets())

    def devices_for(self, slot: Slot) -> list[str | None]:
        """Where the slot may go, in the order tried (the cluster backend overrides this)."""
        return candidate_devices(slot, self.inventory.gpus)

    def room_key(self, device: str | None) -> str:
        """The budget whose room breaks ties between candidates placed on ``device``."""
        return policy.CPU if device is None else device

    def _candidates(self, slot: Slot, now: float) -> list[Candidate]:
        slots = self.manager.slots.values()
        if any(d.seen for d in self.inventory.devices.values()):
            # Fresh figures: what other programs hold on a GPU changes without telling us.
            self.inventory.refresh(int(s.worker.pid) for s in slots if s.worker is not None)
        others = residents(slots, exclude=slot)
        rules = self.limits()
        out = []
        for device in self.devices_for(slot):
            outcome = policy.plan_admission(target_of(slot, device), others, rules, now)
            key = self.room_key(device)
            budget = dict(rules.budgets()).get(key)
            used = sum(r.charge(key) for r in others)
            evicted = 0
            if isinstance(outcome, policy.Plan):
                gone = {e.name for e in outcome.evictions}
                evicted = sum(r.charge(key) for r in others if r.name in gone)
            out.append(Candidate(device, outcome,
                                 room_bytes=0 if budget is None else budget - used,
                                 evicted_bytes=evicted))
        return out

    async def admit(self, slot: Slot, *, deadline: float) -> None:
        """Make room for ``slot`` (retiring victims), place it and reserve its cost."""
        loop = asyncio.get_running_loop()
        async with self.lock:
            while True:
                chosen = choose(self._candidates(slot, loop.time()))
                outcome = chosen.outcome
                if isinstance(outcome, policy.Refusal):
                    if outcome.wait_for and loop.time() < deadline:
                        await self._wait_settled(outcome.wait_for, deadline)
                        continue
                    error_cls = Conflict if outcome.status == 409 else ServiceUnavailable
                    note = self._others_note(chosen.device)
                    if outcome.wait_for:  # it waited, and the deadline ran out
                        note += (f" (waited admission_timeout = "
                                 f"{self.manager.settings.admission_timeout_s:g}s for "
                                 f"{', '.join(outcome.wait_for)} to settle)")
                    raise error_cls(outcome.message + note,
                                    code="no_room",
                                    retry_after_s=outcome.retry_after_s or
                                    (None if outcome.status == 409 else 5))
                if not outcome.evictions:
                    slot.admitted = True
                    slot.placed_device = chosen.device
                    slot.reserved_bytes, slot.reserved_device_bytes = charges(slot, chosen.device)
                    break
                victims = [(self.manager.slots[e.name], e.reason.value)
                           for e in outcome.evictions]
                where = "" if chosen.device in (None, policy.CPU) else f" on {chosen.device}"
                log.info("making room for %s%s: unloading %s", slot.name, where,
                         ", ".join(f"{v.name} ({r})" for v, r in victims))
                results = await asyncio.gather(
                    *(self.manager.retire(v, r) for v, r in victims), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result  # e.g. a busy victim that did not drain in time
        device = slot.placed_device
        if device is not None and self.inventory.releasing(device):
            self.manager.load_progress.report(
                slot.name, None, f"waiting for {device} to release the last worker's memory")
            waited = await self.inventory.wait_released(device)
            log.info("%s: %s's memory showed free after %.2fs", slot.name, device, waited)

    def _others_note(self, device: str | None) -> str:
        """Why a GPU's budget is smaller than configured, when other programs are the reason."""
        d = self.inventory.devices.get(device or "")
        if d is None or not d.used_by_others_bytes:
            return ""
        return (f" (other programs hold {_mib(d.used_by_others_bytes)} on {d.name}, which "
                f"lowers its budget from {_mib(d.budget_bytes or 0)})")

    async def _wait_settled(self, names: Iterable[str], deadline: float) -> None:
        waits: list[asyncio.Future[Any]] = []
        for name in names:
            other = self.manager.slots[name]
            if other.state is State.STOPPING and other.stop_task is not None:
                waits.append(other.stop_task)
            elif other.state is State.LOADING and other.load_future is not None:
                waits.append(other.load_future)
        if not waits:
            # A model that just loaded and whose waiting requests have not resumed yet: they
            # run on the next turns of the loop, so a short pause is enough.
            await asyncio.sleep(0.05)
            return
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        await asyncio.wait([asyncio.shield(w) for w in waits], timeout=timeout)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
