"""Admission on a Ray cluster: the same planner, with each node's devices as the budgets.

:class:`ClusterAdmission` is :class:`~supervisor.admission.Admission` with two answers
changed: the devices a model may go to are the live nodes that have its resources
(``node:NAME``, :mod:`supervisor.cluster.nodes`), and the budgets are every node's
``NAME/ram`` and ``NAME/<resource>``. The router's own machine runs no model, so its RAM
budget does not apply. Everything else (the planner, eviction through ``Manager.retire``,
reservations, waiting for loads and stops to settle) is the one-machine code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor import policy
from supervisor.admission import Admission
from supervisor.cluster import nodes
from supervisor.devices import Inventory
from supervisor.lifecycle import Slot
from supervisor.placement import Candidate, limits

if TYPE_CHECKING:
    from supervisor.cluster.ray_backend import RayBackend
    from supervisor.manager import Manager


class ClusterAdmission(Admission):
    def __init__(self, manager: Manager, inventory: Inventory, backend: RayBackend) -> None:
        super().__init__(manager, inventory)
        self.backend = backend
        self.memory_budget_bytes = None  # no model runs on the router's machine

    def budget_for_models(self) -> int | None:
        return None

    def limits(self) -> policy.Limits:
        return limits(self.manager.settings, None,
                      nodes.budgets(self.backend.nodes, self.backend.resource_names))

    def devices_for(self, slot: Slot) -> list[str | None]:
        return [n.placement for n in self.backend.nodes_for(slot.recipe)]

    def room_key(self, device: str | None) -> str:
        return f"{nodes.node_of(device)}/{nodes.RAM}"

    def _candidates(self, slot: Slot, now: float) -> list[Candidate]:
        out = super()._candidates(slot, now)
        if out:
            return out
        wanted = ", ".join(f"{k}={v:g}" for k, v in slot.recipe.resources.items())
        alive = self.backend.alive_nodes()
        have = "; ".join(
            f"{n.name}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(n.resources.items())
                                      if k in self.backend.resource_names or k == "memory")
            for n in alive) or "none"
        return [Candidate(None, policy.Refusal(
            503, f"cannot load {slot.name!r}: no live node of the Ray cluster has "
                 f"{wanted or 'room for it'} (live nodes: {have})", (), retry_after_s=5.0))]
