"""The Ray backend end to end: a real ``lemonade serve`` with ``cluster`` set, on a real
two-node Ray cluster on this machine, all inside a loopback-only network namespace.

The shared cluster (tests/cluster/conftest.py) is a head node and ``accel-node``, which has
the custom resource ``accel = 1`` standing in for a GPU and twice the head's memory budget.
Checked here: a model that needs ``accel`` lands on ``accel-node`` and a second one evicts
the first there and nothing else; unloading ends the worker process and its actor on the
node; killing the worker, or the whole node, is a crash that the next request recovers from
(on the other node when the model fits there); the idle timer unloads a model on a node;
the status and ``lemonade status`` show each model's node and each node's budgets; and
``cluster = "local"`` starts a Ray of the server's own, which ends with the server. The HTTP
calls are made with the ``openai`` client where a user would use it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.cluster.ray_harness import HERMETIC_RAY_ENV, RayTestCluster
from tests.e2e.conftest import HttpResult, Server, launch_server, wait_for
from tests.helpers import process_gone

pytestmark = pytest.mark.ray

# Deadlines here catch hangs only: a busy 2-core machine must still pass them.
LOAD_S = 120.0
CRASH_S = 60.0

CONFIG = """
[server]
cluster = "{address}"
auto_unload_timer = "never"
heartbeat_interval = "1s"
heartbeat_timeout = "10s"

[models.acc-a]
recipe = "synthetic"
memory = "100MiB"
resources = {{ accel = 1 }}

[models.acc-b]
recipe = "synthetic"
memory = "100MiB"
resources = {{ accel = 1 }}

[models.on-head]
recipe = "synthetic"
memory = "100MiB"
# Ray gives the head node this resource: a recipe can be pinned to a node through it.
resources = {{ "node:__internal_head__" = 0.001 }}

[models.roamer]
recipe = "synthetic"
memory = "100MiB"

[models.brief]
recipe = "synthetic"
memory = "50MiB"
idle_timeout = "2s"

[models.npu-model]
recipe = "synthetic"
resources = {{ npu = 1 }}
"""


class NetnsServer(Server):
    """A ``Server`` whose HTTP requests are made from inside the cluster's namespace."""

    netns: Any = None

    def request(self, *args: Any, **kwargs: Any) -> HttpResult:
        return self.netns.call(super().request, *args, **kwargs)


@pytest.fixture(scope="module")
def server(_ray_cluster_session: RayTestCluster,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsServer]:
    cluster = _ray_cluster_session
    directory = Path(tmp_path_factory.mktemp("ray-backend"))
    started = launch_server(CONFIG.format(address=cluster.address), directory,
                            env={**HERMETIC_RAY_ENV, "HOME": str(directory)},
                            popen=cluster.netns.popen, server_cls=NetnsServer)
    assert isinstance(started, NetnsServer)
    started.netns = cluster.netns
    try:
        yield started
    finally:
        problems = started.stop()
        assert not problems, problems


@pytest.fixture
def fresh(server: NetnsServer, ray_cluster: RayTestCluster) -> NetnsServer:
    """Both nodes up (a killed one restarted) and nothing loaded."""
    assert server.post("/api/v1/unload", {}).status == 200  # every model
    wait_for(lambda: _alive_nodes(server) == {"head", "accel-node"}, LOAD_S,
             what="the router to see both nodes")
    return server


def _alive_nodes(server: NetnsServer) -> set[str]:
    cluster = server.status()["cluster"]
    return {n["name"] for n in cluster["nodes"] if n["alive"]}


def _speech(server: NetnsServer, model: str) -> bytes:
    """One speech request through the openai client, from inside the namespace."""
    def call() -> bytes:
        with httpx.Client(trust_env=False) as http_client:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused",
                                   http_client=http_client, max_retries=0, timeout=LOAD_S)
            return client.audio.speech.create(model=model, voice="alloy", input="hi",
                                              response_format="wav").content
    return server.netns.call(call)  # type: ignore[no-any-return]


def _on_node(cluster: RayTestCluster, pid: int, node: str) -> bool:
    return pid in cluster.node_pids(node)


def test_a_model_that_needs_the_resource_lands_on_the_node_that_has_it(
        fresh: NetnsServer, ray_cluster: RayTestCluster) -> None:
    pid = fresh.load("acc-a")["pid"]
    row = fresh.model("acc-a")
    assert row["node"] == "accel-node" and row["state"] == "ready"
    assert _on_node(ray_cluster, pid, "accel-node")
    assert not _on_node(ray_cluster, pid, "head")
    assert _speech(fresh, "acc-a")[:4] == b"RIFF"
    devices = {d["name"]: d for d in fresh.status()["devices"]}
    assert devices["accel-node/accel"]["used_by_models_bytes"] == 1000  # one unit, in 1/1000
    assert devices["accel-node/ram"]["used_by_models_bytes"] > 0


def test_a_full_node_evicts_on_that_node_only(fresh: NetnsServer,
                                              ray_cluster: RayTestCluster) -> None:
    head_pid = fresh.load("on-head")["pid"]
    assert fresh.model("on-head")["node"] == "head"
    roamer_pid = fresh.load("roamer")["pid"]
    assert fresh.model("roamer")["node"] == "accel-node"  # the roomier node
    first = fresh.load("acc-a")["pid"]
    second = fresh.load("acc-b")["pid"]  # accel = 1 is taken: acc-a must go
    rows = {r["name"]: r for r in fresh.status()["models"]}
    assert rows["acc-b"]["node"] == "accel-node" and rows["acc-b"]["state"] == "ready"
    assert rows["acc-a"]["state"] == "unloaded"
    assert rows["acc-a"]["last_eviction"]["reason"] == "memory"
    wait_for(lambda: process_gone(first), CRASH_S, what="the evicted worker to exit")
    # Nothing else moved: the head's model, and the other model on the same node.
    assert (rows["on-head"]["state"], rows["on-head"]["pid"]) == ("ready", head_pid)
    assert (rows["roamer"]["state"], rows["roamer"]["pid"]) == ("ready", roamer_pid)
    assert _on_node(ray_cluster, second, "accel-node")


def test_unload_ends_the_worker_and_its_actor_on_the_node(
        fresh: NetnsServer, ray_cluster: RayTestCluster) -> None:
    pid = fresh.load("acc-a")["pid"]
    actor_pid = fresh.model("acc-a")["info"]["ray_actor_pid"]
    assert _on_node(ray_cluster, actor_pid, "accel-node")
    unloaded = fresh.post("/api/v1/unload", {"model_name": "acc-a"})
    assert unloaded.status == 200 and unloaded.json()["unloaded"] == ["acc-a"]
    wait_for(lambda: process_gone(pid) and process_gone(actor_pid), CRASH_S,
             what="the worker and its actor to exit")
    row = fresh.model("acc-a")
    assert (row["state"], row["pid"], row["node"]) == ("unloaded", None, None)


def test_a_killed_worker_is_a_crash_and_the_next_request_reloads_it(
        fresh: NetnsServer, ray_cluster: RayTestCluster) -> None:
    pid = fresh.load("acc-a")["pid"]
    psutil.Process(pid).send_signal(signal.SIGKILL)
    row = wait_for(lambda: (r := fresh.model("acc-a"))["state"] == "unloaded" and r, CRASH_S,
                   what="the crash to be seen")
    assert row["last_eviction"]["reason"] == "crash" and row["restarts"] >= 1
    assert _speech(fresh, "acc-a")[:4] == b"RIFF"
    again = fresh.model("acc-a")
    assert again["state"] == "ready" and again["pid"] != pid and again["node"] == "accel-node"
    assert "crash" in fresh.log_text() or "unexpectedly" in fresh.log_text()


def test_a_killed_node_is_a_crash_and_the_model_reloads_on_the_other_node(
        fresh: NetnsServer, ray_cluster: RayTestCluster) -> None:
    pid = fresh.load("roamer")["pid"]
    assert fresh.model("roamer")["node"] == "accel-node"
    ray_cluster.kill_node("accel-node")
    row = wait_for(lambda: (r := fresh.model("roamer"))["state"] == "unloaded" and r, CRASH_S,
                   what="the node's death to be seen as a crash")
    assert row["last_eviction"]["reason"] == "crash"
    assert process_gone(pid)
    wait_for(lambda: "accel-node" not in _alive_nodes(fresh), CRASH_S,
             what="the router to see the node gone")
    assert _speech(fresh, "roamer")[:4] == b"RIFF"  # the next request: on the head now
    assert fresh.model("roamer")["node"] == "head"
    # A model that needs what only the dead node had: a 503 that names it, nothing spawned.
    refused = fresh.post("/api/v1/load", {"model_name": "acc-a"})
    assert refused.status == 503, refused.body
    assert "accel=1" in refused.error["message"]


def test_the_idle_timer_unloads_a_model_on_a_node(fresh: NetnsServer) -> None:
    pid = fresh.load("brief")["pid"]
    row = wait_for(lambda: (r := fresh.model("brief"))["state"] == "unloaded" and r, CRASH_S,
                   what="the idle unload")
    assert row["last_eviction"]["reason"] == "idle"
    wait_for(lambda: process_gone(pid), CRASH_S, what="the idle worker to exit")


def test_a_resource_no_node_has_is_a_503_naming_it(fresh: NetnsServer) -> None:
    refused = fresh.post("/api/v1/load", {"model_name": "npu-model"})
    assert refused.status == 503, refused.body
    assert "npu=1" in refused.error["message"] and "head" in refused.error["message"]
    assert fresh.model("npu-model")["state"] == "unloaded"


def test_status_and_the_cli_show_nodes(fresh: NetnsServer,
                                       ray_cluster: RayTestCluster) -> None:
    fresh.load("acc-a")
    status = fresh.status()
    nodes = {n["name"]: n for n in status["cluster"]["nodes"] if n["alive"]}
    assert nodes["accel-node"]["resources"]["accel"] == 1.0
    assert "accel" not in nodes["head"]["resources"]
    budgets = {d["name"]: d["budget_bytes"] for d in status["devices"]}
    assert budgets["accel-node/ram"] == ray_cluster.specs["accel-node"].memory
    assert budgets["head/ram"] == ray_cluster.specs["head"].memory
    out = ray_cluster.netns.run([str(Path(__import__("sys").executable).parent / "lemonade"),
                                 "status", "--url", fresh.url], check=True).stdout
    assert "Ray cluster" in out and "accel-node" in out and "NODE" in out
    acc_line = next(line for line in out.splitlines() if line.startswith("acc-a "))
    assert acc_line.rstrip().endswith("accel-node")


def test_cluster_local_starts_a_ray_of_its_own_and_ends_it(
        loopback_netns: Any, tmp_path: Path) -> None:
    config = CONFIG.split("[models.acc-a]")[0].replace('cluster = "{address}"',
                                                        'cluster = "local"')
    config += '\n[models.solo]\nrecipe = "synthetic"\nmemory = "50MiB"\n'
    # Ray's defaults for a new local instance (token auth on, its token in ~/.ray): in a
    # HOME of the test's own.
    server = launch_server(config, tmp_path, env={"HOME": str(tmp_path)},
                           popen=loopback_netns.popen, server_cls=NetnsServer)
    assert isinstance(server, NetnsServer)
    server.netns = loopback_netns
    try:
        pid = server.load("solo")["pid"]
        row = server.model("solo")
        nodes = server.status()["cluster"]["nodes"]
        assert len(nodes) == 1 and row["node"] == nodes[0]["name"]
        assert pid in {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
    finally:
        problems = server.stop()
    assert not problems, problems
    # Its Ray ended with it: nothing but the namespace's holder is left inside.
    wait_for(lambda: loopback_netns.pids_inside() == [loopback_netns.holder_pid], CRASH_S,
             what="the server's own Ray processes to end")
