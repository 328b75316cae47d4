"""The Ray test harness itself: the loopback-only namespace, the two-node cluster (names,
resources), killing a node, and cleanup that leaves no process behind."""

from __future__ import annotations

import asyncio
import http.server
import logging
import socket
import subprocess
import threading
import time
import urllib.request

import psutil
import pytest

from tests.cluster.ray_harness import (
    GIB,
    PYTHON,
    LoopbackNetns,
    RayTestCluster,
    kill_processes,
    process_tree,
)

pytestmark = pytest.mark.ray
log = logging.getLogger(__name__)

# Deadlines here only catch hangs: a busy 2-core machine must still pass them.
DEAD_WITHIN_S = 60.0


def _free_port_inside(netns: LoopbackNetns) -> int:
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return netns.call(pick)


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status


def test_namespace_has_only_loopback(loopback_netns: LoopbackNetns) -> None:
    out = loopback_netns.run(["ip", "-o", "addr"], check=True).stdout
    names = {line.split()[1] for line in out.splitlines() if line.strip()}
    assert names == {"lo"}, out
    links = loopback_netns.run(["ip", "-o", "link"], check=True).stdout
    assert [line.split()[1] for line in links.splitlines()] == ["lo:"], links
    assert "UP" in links


async def test_calls_reach_a_server_inside_and_the_host_thread_cannot(
    loopback_netns: LoopbackNetns,
) -> None:
    port = _free_port_inside(loopback_netns)
    server = loopback_netns.popen(
        [PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert await loopback_netns.acall(_get, url) == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "server inside never answered"
                await asyncio.sleep(0.1)
        assert loopback_netns.call(_get, url) == 200
        with pytest.raises(OSError):  # the host namespace has no such server
            _get(url)
    finally:
        kill_processes(process_tree(server.pid))
        server.wait(timeout=10)


def test_host_server_is_not_reachable_from_inside(loopback_netns: LoopbackNetns) -> None:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        with pytest.raises(OSError):
            loopback_netns.call(_get, url)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_two_nodes_with_their_names_and_resources(ray_cluster: RayTestCluster) -> None:
    alive = [n for n in ray_cluster.nodes() if n["Alive"]]
    by_name = {RayTestCluster.node_name(n): n for n in alive}
    assert set(by_name) == {"head", "accel-node"}, alive
    head, accel = by_name["head"]["Resources"], by_name["accel-node"]["Resources"]
    assert head["CPU"] == 2 and head["memory"] == 2 * GIB and "accel" not in head
    assert accel["CPU"] == 2 and accel["memory"] == 4 * GIB and accel["accel"] == 1
    for node in alive:
        assert node["NodeManagerAddress"] == "127.0.0.1"
        assert node["Labels"]["lemonade-node"] == node["NodeName"]
    out = ray_cluster.netns.run(["ip", "-o", "addr"], check=True).stdout
    assert {line.split()[1] for line in out.splitlines()} == {"lo"}
    log.warning("cold start %.1f s; RSS head %.0f MiB, accel-node %.0f MiB",
                ray_cluster.cold_start_s, ray_cluster.rss_bytes("head") / 2**20,
                ray_cluster.rss_bytes("accel-node") / 2**20)


def test_a_killed_node_is_declared_dead_and_comes_back(ray_cluster: RayTestCluster) -> None:
    t0 = time.monotonic()
    pids = ray_cluster.kill_node("accel-node")
    assert pids and not any(psutil.pid_exists(p) and psutil.Process(p).status()
                            != psutil.STATUS_ZOMBIE for p in pids)
    ray_cluster.wait_dead("accel-node", timeout=DEAD_WITHIN_S)
    log.warning("killed node declared dead after %.1f s", time.monotonic() - t0)
    ray_cluster.restart_node("accel-node")
    alive = [n for n in ray_cluster.nodes() if n["Alive"]]
    assert {RayTestCluster.node_name(n) for n in alive} == {"head", "accel-node"}


def test_close_leaves_no_process_and_no_temp_dir(tmp_path_factory: pytest.TempPathFactory,
                                                 ) -> None:
    owned: set[int] = set()
    cluster = RayTestCluster(tmp_path_factory.mktemp("rc"), owned=owned)
    try:
        pids = {p.pid for p in process_tree(cluster.launcher_pid)}
        holder = cluster.netns.holder_pid
        assert owned == {cluster.launcher_pid} and len(pids) > 4
    finally:
        cluster.close()
    left = [p for p in pids | {holder} if psutil.pid_exists(p)]
    assert not left, left
    assert not cluster.temp_dir.exists()
    assert owned == set()
