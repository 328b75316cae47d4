"""What the Ray backend relies on, checked against the Ray we pin (2.60) on the harness's
two-node cluster: a driver inside the namespace connects to 127.0.0.1 while two raylets
share that address; an actor can be pinned to a node by node id (hard affinity) or by a
custom resource; ``ray.kill`` ends the actor's process; a process the actor started in a
session of its own outlives ``ray.kill`` (so the backend must end such a child itself)."""

from __future__ import annotations

import json
import logging

import psutil
import pytest

from tests.cluster.ray_harness import RayTestCluster, kill_processes

pytestmark = pytest.mark.ray
log = logging.getLogger(__name__)

DRIVER = r"""
import os, subprocess, sys, time
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=ADDRESS)
me = ray.get_runtime_context().get_node_id()
nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
accel_id = next(i for i, n in nodes.items() if n["Labels"].get("lemonade-node") == "accel-node")

@ray.remote(num_cpus=0)
class Probe:
    def where(self):
        return os.getpid(), ray.get_runtime_context().get_node_id()
    def spawn(self):
        return subprocess.Popen(["sleep", "300"], start_new_session=True).pid
    def spawn_grandchild(self):
        p = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"],
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
        return int(p.stdout.readline())

out = {"driver_node": nodes[me]["Labels"].get("lemonade-node")}
a = Probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(accel_id, soft=False)).remote()
pid_a, node_a = ray.get(a.where.remote())
b = Probe.options(resources={"accel": 1}).remote()
pid_b, node_b = ray.get(b.where.remote())
out["affinity_node"] = nodes[node_a]["Labels"].get("lemonade-node")
out["resource_node"] = nodes[node_b]["Labels"].get("lemonade-node")
child = ray.get(a.spawn.remote())
grandchild = ray.get(a.spawn_grandchild.remote())
t0 = time.monotonic()
ray.kill(a)
def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:  # gone (between open and read, too)
        return True
while not gone(pid_a) and time.monotonic() - t0 < 30:
    time.sleep(0.01)
out["kill_gone_s"] = round(time.monotonic() - t0, 3) if gone(pid_a) else None
time.sleep(1)
out["child_survives"] = not gone(child)
out["grandchild_survives"] = not gone(grandchild)
out["child_pids"] = [child, grandchild]
ray.kill(b)
print("FACTS=" + json.dumps(out))
"""


def test_driver_affinity_resources_and_kill(ray_cluster: RayTestCluster) -> None:
    res = ray_cluster.driver(DRIVER, timeout=180)
    line = next((x for x in res.stdout.splitlines() if x.startswith("FACTS=")), None)
    assert line, res.stderr[-4000:]
    facts = json.loads(line[len("FACTS="):])
    children = facts["child_pids"]
    try:
        log.warning("Ray facts: %s; driver stderr: %s", json.dumps(facts), res.stderr[-3000:])
        assert facts["driver_node"] in ("head", "accel-node")
        assert facts["affinity_node"] == "accel-node"
        assert facts["resource_node"] == "accel-node"
        assert facts["kill_gone_s"] is not None and facts["kill_gone_s"] < 30
        # Ray 2.60 (RAY_kill_child_processes_on_worker_exit, on by default) ends the
        # actor's direct children on ray.kill, even one in a session of its own.
        assert facts["child_survives"] is False
    finally:  # end any orphan by its pid (ours: it runs inside our namespace)
        for pid in children:
            try:
                kill_processes([psutil.Process(pid)])
            except psutil.Error:
                pass
