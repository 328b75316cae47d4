"""The Ray backend's config values and its planning, without Ray.

``supervisor.cluster.nodes`` turns nodes into the planner's devices and a model into charges
on them; ``ClusterAdmission`` asks the one planner over those devices. Here the node list is
plain data (what ``ray.nodes()`` returns), so the rules the cluster tests check with real
nodes (a model that needs a resource lands on a node that has it; a full node evicts only on
that node; the most room wins) are checked exhaustively and fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import policy
from supervisor.cluster import nodes
from supervisor.cluster.admission import ClusterAdmission
from supervisor.cluster_config import parse_cluster, parse_resources
from supervisor.config_values import ConfigError
from supervisor.lifecycle import State
from supervisor.manager import Manager
from supervisor.placement import choose
from tests.helpers import settings_from_toml

GiB = 2**30


def ray_node(name: str, *, memory: int, alive: bool = True, **resources: float) -> dict[str, Any]:
    return {"NodeID": (name.encode().hex() * 8)[:56], "Alive": alive,
            "NodeManagerAddress": "127.0.0.1", "Labels": {nodes.NAME_LABEL: name},
            "Resources": {"CPU": 2.0, "memory": float(memory), **resources}}


class FakeBackend:
    """What ClusterAdmission reads of RayBackend: the node list and the resource names."""

    def __init__(self, raw: list[dict[str, Any]], resource_names: list[str]) -> None:
        self.nodes = [nodes.from_ray(r) for r in raw]
        self.resource_names = resource_names

    def alive_nodes(self) -> list[nodes.Node]:
        return [n for n in self.nodes if n.alive]

    def nodes_for(self, recipe: Any) -> list[nodes.Node]:
        return [n for n in self.alive_nodes() if n.has(recipe.resources)]


CONFIG = """
[models.small]
recipe = "synthetic"
memory = "1GiB"
[models.big]
recipe = "synthetic"
memory = "3GiB"
[models.accel-a]
recipe = "synthetic"
memory = "1GiB"
resources = { accel = 1 }
[models.accel-b]
recipe = "synthetic"
memory = "1GiB"
resources = { accel = 1 }
"""


@pytest.fixture
def manager(tmp_path: Path) -> Manager:
    settings = settings_from_toml(tmp_path, CONFIG)
    m = Manager(settings)
    backend = FakeBackend([ray_node("head", memory=4 * GiB),
                           ray_node("accel-node", memory=2 * GiB, accel=1.0)], ["accel"])
    m.admission = ClusterAdmission(m, m.inventory, backend)  # type: ignore[arg-type]
    return m


def place(m: Manager, name: str) -> None:
    """Mark ``name`` as loaded where the planner puts it (no process: planning only)."""
    slot = m.slots[name]
    chosen = choose(m.admission._candidates(slot, 0.0))
    assert isinstance(chosen.outcome, policy.Plan) and not chosen.outcome.evictions
    slot.placed_device = chosen.device
    slot.state = State.READY
    slot.admitted = True


def plan(m: Manager, name: str) -> tuple[str | None, policy.Plan | policy.Refusal]:
    chosen = choose(m.admission._candidates(m.slots[name], 0.0))
    return chosen.device, chosen.outcome


def test_a_model_that_needs_a_resource_goes_to_the_node_that_has_it(manager: Manager) -> None:
    device, outcome = plan(manager, "accel-a")
    assert device == "node:accel-node"
    assert isinstance(outcome, policy.Plan) and not outcome.evictions


def test_a_model_without_resources_goes_where_there_is_most_room(manager: Manager) -> None:
    assert plan(manager, "small")[0] == "node:head"  # 4 GiB against 2 GiB


def test_a_full_node_evicts_on_that_node_only(manager: Manager) -> None:
    place(manager, "small")  # head: 1 of 4 GiB
    place(manager, "accel-a")  # accel-node: 1 of 2 GiB, its accel taken
    device, outcome = plan(manager, "accel-b")
    assert device == "node:accel-node"
    assert isinstance(outcome, policy.Plan)
    assert [e.name for e in outcome.evictions] == ["accel-a"]
    assert outcome.evictions[0].reason is policy.EvictionReason.MEMORY


def test_the_roomier_node_is_chosen_over_evicting(manager: Manager) -> None:
    place(manager, "big")  # 3 GiB: only the head has room
    assert manager.slots["big"].placed_device == "node:head"
    device, outcome = plan(manager, "small")  # head has 1 GiB left, accel-node 2 GiB
    assert device == "node:accel-node"
    assert isinstance(outcome, policy.Plan) and not outcome.evictions


def test_no_node_with_the_resource_is_a_503_naming_it(manager: Manager) -> None:
    backend = manager.admission.backend  # type: ignore[attr-defined]
    backend.nodes = [n for n in backend.nodes if n.name == "head"]
    device, outcome = plan(manager, "accel-a")
    assert device is None
    assert isinstance(outcome, policy.Refusal) and outcome.status == 503
    assert "accel=1" in outcome.message and "head" in outcome.message


def test_a_dead_node_gets_nothing(manager: Manager) -> None:
    backend = manager.admission.backend  # type: ignore[attr-defined]
    backend.nodes = [nodes.from_ray(ray_node("head", memory=4 * GiB, alive=False)),
                     *[n for n in backend.nodes if n.name != "head"]]
    assert plan(manager, "small")[0] == "node:accel-node"


def test_a_model_larger_than_every_node_is_refused_with_the_sizes(manager: Manager) -> None:
    backend = manager.admission.backend  # type: ignore[attr-defined]
    backend.nodes = [n for n in backend.nodes if n.name == "accel-node"]
    device, outcome = plan(manager, "big")
    assert isinstance(outcome, policy.Refusal) and outcome.status == 409
    assert "3 GiB on accel-node/ram" in outcome.message and "2 GiB" in outcome.message


def test_resource_amounts_read_as_units_in_messages() -> None:
    limits = policy.Limits(device_budgets={"n/npu": 1000})
    target = policy.Target(name="t", type="llm", group=None, priority=0, cost_bytes=0,
                           device_costs={"n/npu": 2000})
    outcome = policy.plan_admission(target, [], limits, 0.0)
    assert isinstance(outcome, policy.Refusal)
    assert "needs 2 npu on n/npu" in outcome.message and "is 1 npu" in outcome.message


def test_charges_are_the_estimate_then_what_was_measured_on_that_node(
        manager: Manager) -> None:
    slot = manager.slots["accel-a"]
    assert nodes.charges(slot, "node:accel-node") == (
        0, {"accel-node/ram": 1 * GiB, "accel-node/accel": 1000})
    slot.measured_device, slot.measured_ram_bytes = "node:accel-node", 300 * 2**20
    assert nodes.charges(slot, "node:accel-node")[1]["accel-node/ram"] == 300 * 2**20
    assert nodes.charges(slot, "node:head")[1]["head/ram"] == 1 * GiB  # measured elsewhere


def test_a_node_without_label_is_named_by_its_id() -> None:
    raw = ray_node("x", memory=GiB)
    raw["Labels"] = {}
    assert nodes.from_ray(raw).name == raw["NodeID"][:12]


@pytest.mark.parametrize(("value", "expected"), [
    ("", None), ("off", None), ("local", "local"), ("AUTO", "auto"),
    ("127.0.0.1:6379", "127.0.0.1:6379"), ("ray://head.lan:10001", "ray://head.lan:10001"),
    ("[::1]:6379", "[::1]:6379"),
])
def test_cluster_values(value: str, expected: str | None) -> None:
    assert parse_cluster(value, "where", True) == expected


@pytest.mark.parametrize("value", ["head", "head:0", "head:99999", "http://x:1", 5, "a b:1"])
def test_bad_cluster_values_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match="where: expected"):
        parse_cluster(value, "where", False)


@pytest.mark.parametrize(("raw", "message"), [
    ({"CPU": 1}, "not a resource a model asks for"),
    ({"memory": 1}, "not a resource a model asks for"),
    ({"GPU": 0}, "a positive number"),
    ({"GPU": True}, "a positive number"),
    ({"GPU": 1.5}, "a fraction below 1"),
    ({"9x": 1}, "a Ray resource name"),
    ([1], "a table of Ray resources"),
])
def test_bad_resources_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_resources(raw, "[models.m]")


def test_resources_in_a_recipe(tmp_path: Path) -> None:
    settings = settings_from_toml(tmp_path, CONFIG)
    assert dict(settings.models["accel-a"].resources) == {"accel": 1.0}
    assert dict(settings.models["small"].resources) == {}


def test_the_one_machine_server_does_not_import_ray() -> None:
    assert "ray" not in sys.modules or "supervisor.cluster.ray_backend" in sys.modules


def test_a_cluster_without_ray_installed_is_a_config_error_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs Ray.*lemonade-supervisor\[ray\]"):
        parse_cluster("auto", "[server] cluster", False)


def test_node_names_stay_unique_among_live_nodes() -> None:
    dead = nodes.from_ray(ray_node("gpu-box", memory=GiB, alive=False))
    first = nodes.from_ray({**ray_node("gpu-box", memory=GiB), "NodeID": "a" * 56})
    second = nodes.from_ray({**ray_node("gpu-box", memory=GiB), "NodeID": "b" * 56})
    listed = nodes.unique_names([dead, second, first])
    assert [(n.name, n.alive) for n in listed] == [
        ("gpu-box", True), ("gpu-box-bbbbbb", True), ("gpu-box", False)]
    assert set(nodes.budgets(listed, [])) == {"gpu-box/ram", "gpu-box-bbbbbb/ram"}
