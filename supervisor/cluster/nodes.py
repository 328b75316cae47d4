"""The nodes of a Ray cluster as the planner sees them: devices with budgets, and charges.

No Ray import: the backend turns ``ray.nodes()`` into :class:`Node` values, and everything
else (the planner, the status) works on those.

A model placed on node ``N`` is placed on the planner device ``node:N`` and is charged on
the devices ``N/ram`` (its memory: the recipe's ``memory`` until measured, then what the
worker reports) and ``N/<resource>`` for each Ray resource its recipe asks for. The budgets
are the node's: ``N/ram`` is Ray's ``memory`` figure for the node (``ray start --memory``,
else what Ray computed), ``N/<resource>`` its total of that resource. Resources are planned
in thousandths (:data:`UNIT`), so ``GPU = 0.5`` is a cost of 500 on a budget of 1000 per
GPU. As every node's devices are distinct, a model that does not fit on a node can only
evict models on that node, and the cluster-wide rules (model caps, priorities, pinning,
exclusive groups) apply across nodes exactly as on one machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

NODE_PREFIX = "node:"
RAM = "ram"
#: Resource amounts are planned in thousandths of a unit (Ray's own granularity is 1/10000).
UNIT = 1000
#: A node started with ``--labels='{"lemonade-node": "gpu-box"}'`` is called "gpu-box";
#: other nodes are called by the first 12 hex digits of their Ray node id.
NAME_LABEL = "lemonade-node"


@dataclass(frozen=True)
class Node:
    name: str
    node_id: str
    address: str
    alive: bool
    #: Ray's totals for the node (``CPU``, ``GPU``, ``memory``, custom resources).
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int | None:
        memory = self.resources.get("memory")
        return None if memory is None else int(memory)

    @property
    def placement(self) -> str:
        return NODE_PREFIX + self.name

    def has(self, resources: Mapping[str, float]) -> bool:
        """Whether the node has (in total) every resource a recipe asks for."""
        return all(self.resources.get(name, 0.0) >= amount for name, amount in resources.items())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "node_id": self.node_id, "address": self.address,
                "alive": self.alive, "resources": dict(self.resources),
                "labels": dict(self.labels)}


def from_ray(raw: Mapping[str, Any]) -> Node:
    """One entry of ``ray.nodes()``."""
    labels = {str(k): str(v) for k, v in (raw.get("Labels") or {}).items()}
    node_id = str(raw.get("NodeID", ""))
    return Node(
        name=labels.get(NAME_LABEL) or node_id[:12],
        node_id=node_id,
        address=str(raw.get("NodeManagerAddress", "")),
        alive=bool(raw.get("Alive", False)),
        resources={str(k): float(v) for k, v in (raw.get("Resources") or {}).items()},
        labels=labels,
    )


def unique_names(found: Iterable[Node]) -> list[Node]:
    """Live nodes first, by name; a live node whose name another live node already has
    (two machines given the same label) is told apart by its id, so their budgets and
    placements never mix. Dead nodes keep their names: they are only listed."""
    out: list[Node] = []
    taken: set[str] = set()
    for node in sorted(found, key=lambda n: (not n.alive, n.name, n.node_id)):
        if node.alive and node.name in taken:
            node = replace(node, name=f"{node.name}-{node.node_id[:6]}")
        if node.alive:
            taken.add(node.name)
        out.append(node)
    return out


def node_of(placement: str | None) -> str | None:
    """``node:N`` -> ``N``; None for any other placement."""
    if placement is None or not placement.startswith(NODE_PREFIX):
        return None
    return placement[len(NODE_PREFIX):]


def budgets(nodes: Iterable[Node], resource_names: Iterable[str]) -> dict[str, int]:
    """The planner's device budgets: ``N/ram`` and ``N/<resource>`` for every live node."""
    wanted = set(resource_names)
    out: dict[str, int] = {}
    for node in nodes:
        if not node.alive:
            continue
        if node.memory_bytes is not None:
            out[f"{node.name}/{RAM}"] = node.memory_bytes
        for name in wanted:
            if name in node.resources:
                out[f"{node.name}/{name}"] = round(node.resources[name] * UNIT)
    return out


def charges(slot: Any, placement: str) -> tuple[int, dict[str, int]]:
    """(bytes on the router's machine, {device: amount}) for ``slot`` placed on a node.

    Nothing is charged on the router's machine: the worker runs on the node.
    """
    node = node_of(placement)
    assert node is not None, placement
    recipe = slot.recipe
    measured = slot.measured_device == placement and slot.measured_ram_bytes is not None
    ram = slot.measured_ram_bytes if measured else (recipe.memory_bytes or 0)
    out = {f"{node}/{RAM}": int(ram or 0)}
    for name, amount in recipe.resources.items():
        out[f"{node}/{name}"] = round(amount * UNIT)
    return 0, out


def describe_amount(device: str, amount: int) -> str | None:
    """How a planner message names an amount on a node's resource device (``1 npu``); None
    for a device whose amounts are bytes."""
    node, slash, resource = device.partition("/")
    if not slash or resource == RAM:
        return None
    return f"{amount / UNIT:g} {resource}"
