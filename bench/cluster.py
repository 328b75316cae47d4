"""The Ray backend's costs, side by side with one machine: placement, load, router memory.

1. Placement decision time: ``Admission._candidates`` + ``placement.choose`` (what the
   manager runs under its placement lock for every load), in-process, timed one call at a
   time. One machine (the CPU alone) against a cluster of 2, 8 and 32 nodes (fake node
   lists: the planner only reads ``ray.nodes()`` data), with 16 models of 400 MiB resident,
   spread over the nodes as the planner itself placed them; for a model that fits, and a
   6 GiB one (of an 8 GiB budget per node) that evicts wherever no node is empty enough.
2. Load and unload through Ray against locally: a real two-node Ray cluster on this machine
   (tests/cluster/ray_harness.py, inside a loopback-only network namespace: root needed),
   one router with ``cluster`` set and one without (zygotes off = a fresh spawn, and lazy =
   a fork from a warm zygote), both inside the namespace; a synthetic model is loaded and
   unloaded N times through ``/api/v1/load`` and ``/api/v1/unload``; the router's own
   ``load_seconds`` and the wall time of each call are reported.
3. Router RSS: the ``lemonade serve`` process after those loads, with and without the Ray
   driver in it (psutil).

Run: ``.venv/bin/python bench/cluster.py`` (about 2 minutes; ``--rounds`` sets N,
``--no-ray`` runs part 1 only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from harness import ServerProcess, print_table, summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor import placement, policy  # noqa: E402
from supervisor.admission import Admission  # noqa: E402
from supervisor.cluster import nodes  # noqa: E402
from supervisor.cluster.admission import ClusterAdmission  # noqa: E402
from supervisor.config import load_settings  # noqa: E402
from supervisor.lifecycle import State  # noqa: E402
from supervisor.manager import Manager  # noqa: E402

MIB = 2**20
GIB = 2**30
RESIDENTS = 16


# ==================================================================== 1. placement


class _Nodes:
    """A fixed node list in the shape ClusterAdmission reads (RayBackend's attributes)."""

    def __init__(self, count: int) -> None:
        self.nodes = [nodes.from_ray({
            "NodeID": f"{i:056x}", "Alive": True, "NodeManagerAddress": f"10.0.0.{i}",
            "Labels": {nodes.NAME_LABEL: f"n{i:02d}"},
            "Resources": {"CPU": 8.0, "memory": float(8 * GIB)},
        }) for i in range(count)]
        self.resource_names: list[str] = []

    def alive_nodes(self) -> list[nodes.Node]:
        return self.nodes

    def nodes_for(self, recipe: Any) -> list[nodes.Node]:
        return [n for n in self.nodes if n.has(recipe.resources)]


def _manager(node_count: int | None, workdir: Path) -> Manager:
    lines = ["[server]", 'memory_budget = "8GiB"']
    for i in range(RESIDENTS + 2):
        lines += [f"[models.m{i:02d}]", 'recipe = "synthetic"', 'memory = "400MiB"']
    lines += ["[models.big]", 'recipe = "synthetic"', 'memory = "6GiB"']
    path = workdir / f"placement-{node_count}.toml"
    path.write_text("\n".join(lines) + "\n")
    manager = Manager(load_settings(cli={"config": str(path)}, env={}, cwd=workdir))
    backend = _Nodes(node_count) if node_count else None
    if backend is not None:
        manager.admission = ClusterAdmission(manager, manager.inventory, backend)  # type: ignore[arg-type]
    # 16 residents, spread over the nodes the planner itself would pick, with distinct LRU.
    for i in range(RESIDENTS):
        slot = manager.slots[f"m{i:02d}"]
        chosen = placement.choose(manager.admission._candidates(slot, 0.0))
        slot.placed_device = chosen.device
        slot.state, slot.admitted = State.READY, True
        slot.last_used_mono = float((i * 7) % RESIDENTS)
    return manager


def _time_decisions(admission: Admission, slot: Any, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        placement.choose(admission._candidates(slot, 100.0))
        out.append((time.perf_counter() - started) * 1e6)
    return out


def bench_placement(calls: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lemonade-cluster-bench-") as tmp:
        for count in (None, 2, 8, 32):
            manager = _manager(count, Path(tmp))
            label = "one machine (cpu)" if count is None else f"Ray, {count} nodes"
            for case in ("fits", "big"):
                slot = manager.slots[f"m{RESIDENTS:02d}" if case == "fits" else "big"]
                decided = placement.choose(manager.admission._candidates(slot, 100.0))
                evicted = (len(decided.outcome.evictions)
                           if isinstance(decided.outcome, policy.Plan) else "refused")
                median, p99 = summary(_time_decisions(manager.admission, slot, calls))
                rows.append([label, case, median, p99, str(decided.device), evicted])
    print_table(f"Placement decision time, µs per load ({RESIDENTS} models resident; "
                f"'big' needs 6 GiB of an 8 GiB budget per node; {calls} calls each)",
                ["setup", "model", "p50 µs", "p99 µs", "chosen", "evictions"], rows)


# ==================================================================== 2-3. real cluster


def _config(cluster: str | None, zygotes: str) -> str:
    lines = ["[server]", 'auto_unload_timer = "never"', f'zygotes = "{zygotes}"']
    if cluster:
        lines.append(f'cluster = "{cluster}"')
    lines += ["[models.syn]", 'recipe = "synthetic"', 'memory = "100MiB"']
    return "\n".join(lines) + "\n"


def _cycle(server: ServerProcess, netns: Any, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"load_wall": [], "load_seconds": [], "unload_wall": [],
                                   "hello": [], "actor": []}
    for _ in range(rounds):
        started = time.perf_counter()
        loaded = netns.call(server.request, "POST", "/api/v1/load", {"model_name": "syn"})
        out["load_wall"].append(time.perf_counter() - started)
        out["load_seconds"].append(float(loaded["load_seconds"]))
        info = netns.call(server.model_row, "syn")["info"]
        out["hello"].append(float(info.get("hello_seconds", 0.0)))
        out["actor"].append(float(info.get("ray_actor_seconds", 0.0)))
        started = time.perf_counter()
        netns.call(server.request, "POST", "/api/v1/unload", {"model_name": "syn"})
        out["unload_wall"].append(time.perf_counter() - started)
    return out


def bench_cluster(rounds: int) -> None:
    from tests.cluster.ray_harness import RayTestCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"\n(parts 2-3 skipped: {reason})")
        return
    results: dict[str, dict[str, list[float]]] = {}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lemonade-cluster-bench-") as tmp:
        cluster = RayTestCluster()
        try:
            print(f"\ntwo-node Ray cluster up in {cluster.cold_start_s:.1f}s "
                  f"(head + node RSS {cluster.rss_bytes() / MIB:.0f} MiB)")
            for label, address, zygotes in (("local, spawn", None, "off"),
                                            ("local, zygote fork", None, "lazy"),
                                            ("Ray node", cluster.address, "off")):
                workdir = Path(tmp) / label.replace(" ", "-").replace(",", "")
                workdir.mkdir()
                server = _netns_server(cluster.netns, _config(address, zygotes), workdir)
                try:
                    _cycle(server, cluster.netns, 1)  # a first round warms caches/zygote
                    results[label] = _cycle(server, cluster.netns, rounds)
                    rss[label] = psutil.Process(server.pid).memory_info().rss / MIB
                finally:
                    server.stop()
        finally:
            cluster.close()
    rows = []
    for label, values in results.items():
        load_p50, load_p99 = summary(values["load_wall"])
        unload_p50, unload_p99 = summary(values["unload_wall"])
        rows.append([label, load_p50, load_p99, statistics.median(values["load_seconds"]),
                     statistics.median(values["actor"]), statistics.median(values["hello"]),
                     unload_p50, unload_p99, rss[label]])
    print_table(f"Load and unload of a synthetic model, seconds ({rounds} rounds each; "
                "'actor' = Ray placing the WorkerHost actor and it starting the worker, "
                "'hello' = from the start to the worker's hello, actor included)",
                ["where", "load p50", "load p99", "load_seconds p50", "actor p50",
                 "hello p50", "unload p50", "unload p99", "router RSS MiB"], rows)


def _netns_server(netns: Any, config: str, workdir: Path) -> ServerProcess:
    """A ServerProcess whose ``lemonade serve`` runs inside the namespace."""
    from tests.cluster.ray_harness import HERMETIC_RAY_ENV

    path = workdir / "lemonade.toml"
    path.write_text(config)
    server = ServerProcess.__new__(ServerProcess)
    argv = ["nsenter", f"--net={netns.ns_path}", "--", sys.executable, "-m", "supervisor.cli",
            "serve", "--config", str(path), "--port", "0", "--log-level", "info"]
    env = {**os.environ, **HERMETIC_RAY_ENV, "HOME": str(workdir)}  # see the harness
    server._start(argv, workdir, env, 120.0)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="planner calls per row")
    parser.add_argument("--rounds", type=int, default=10, help="load/unload rounds per row")
    parser.add_argument("--no-ray", action="store_true", help="part 1 only (no cluster)")
    args = parser.parse_args()
    bench_placement(args.calls)
    if not args.no_ray:
        bench_cluster(args.rounds)


if __name__ == "__main__":
    main()
