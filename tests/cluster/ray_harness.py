"""A two-node Ray cluster on this one machine, kept on loopback, for the Ray backend's tests.

Why this exists: Ray binds the host's network address by default, and on the machines these
tests run on, test traffic must stay on loopback. So every Ray process (and the router that
talks to Ray) runs inside a network namespace of its own that has only a loopback interface
(``LoopbackNetns``); Ray then has no other address to use. The test process itself stays in
the host namespace and reaches servers inside through ``LoopbackNetns.call``/``acall`` (a
dedicated thread that has entered the namespace; sockets it creates live there).

``ray stop`` ends every Ray process on the machine by name, so it is never used here:
``RayTestCluster`` ends exactly the processes it started, by pid (each ``ray start`` and its
whole process tree, collected with psutil before killing, then any process still left in
our private namespace, which only we can have started), and reaps them.

The cluster is a head node and a second node ("accel-node") with different resources: the
second one has a custom resource ``accel`` that stands in for a GPU (no accelerator is
needed; Ray only counts it). Both bind 127.0.0.1 on fixed ports: the namespace is private.
A killed node is declared dead within a few seconds (fast GCS health checks, set through
``--system-config`` on the head).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, MutableSet, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import psutil

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

VENV_BIN = Path(sys.executable).parent
RAY_BIN = VENV_BIN / "ray"
PYTHON = sys.executable

#: Unix socket paths (temp_dir/session_<date>_<pid>/sockets/plasma_store) must stay under
#: 107 bytes; Ray adds ~65 bytes to the temp dir.
MAX_TEMP_DIR_LEN = 40

#: The node label key that names a node (``ray start --labels lemonade-node=<name>``).
NODE_LABEL = "lemonade-node"

#: Health checks on the head's GCS: a SIGKILLed raylet is declared dead after
#: period * threshold (+ timeout) ms, about 1.5-2 s. Names checked against Ray 2.60's GCS.
FAST_FAILURE_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}

GIB = 1024**3

#: For every Ray process the tests start (nodes, drivers, routers that join the cluster).
#: Ray 2.60 turns token authentication on for a new local ``ray.init()`` and writes
#: ``~/.ray/auth_token``; a later ``ray start`` that finds the file enables it too, and then
#: a node or driver without the token is refused. The test cluster runs without tokens (it is
#: alone in its namespace), said explicitly so no token file anywhere changes that.
HERMETIC_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def setns_net(path: str) -> None:
    """Move the calling thread into the network namespace at ``path`` (/proc/<pid>/ns/net)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def unavailable_reason() -> str | None:
    """Why Ray tests cannot run here (None when they can): root, unshare, nsenter, ip, ray."""
    if os.geteuid() != 0:
        return "Ray tests need root (a loopback-only network namespace: unshare -n)"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"Ray tests need {tool!r} (util-linux / iproute2) on PATH"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray tests need ray importable (pip install 'lemonade-supervisor[ray]')"
    if not RAY_BIN.exists():
        return f"Ray tests need the ray CLI next to the interpreter ({RAY_BIN})"
    return None


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def kill_processes(procs: Iterable[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL each (still the same process: psutil checks the start time) and wait."""
    procs = list(procs)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


class LoopbackNetns:
    """A network namespace with only ``lo`` (up), kept alive by a holder process.

    ``popen``/``run`` start processes inside it; ``call``/``acall`` run a callable in a
    thread that has entered it (for HTTP calls from the test to a server inside).
    Use as a context manager, or call ``close()``.
    """

    def __init__(self, *, start_timeout: float = 10.0) -> None:
        self._holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.holder_pid = self._holder.pid
        self.ns_path = f"/proc/{self.holder_pid}/ns/net"
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        host_ns = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + start_timeout
        while True:  # lo is up once sh has exec'd sleep
            if self._holder.poll() is not None:
                raise RuntimeError(f"netns holder exited with {self._holder.returncode}")
            try:
                comm = Path(f"/proc/{self.holder_pid}/comm").read_text().strip()
                ino = os.stat(self.ns_path).st_ino
            except OSError:
                comm, ino = "", host_ns
            if comm == "sleep" and ino != host_ns:
                self.inode = ino
                break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("netns holder did not bring lo up in time")
            time.sleep(0.01)

    # -- processes inside ------------------------------------------------------------
    def _wrap(self, args: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.ns_path}", "--", *map(str, args)]

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside the namespace, in a session of its own (so its group can be
        killed). The caller owns the process: end it by pid (``kill_processes``) and reap."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self._wrap(args), **kw)

    def run(self, args: Sequence[str], *, timeout: float = 60.0, check: bool = False,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a short command inside (``lemonade status --url ...``, a driver script) and
        return its CompletedProcess (text stdout/stderr captured). Killed on timeout."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return cast("subprocess.CompletedProcess[str]",
                    subprocess.run(self._wrap(args), timeout=timeout, check=check, **kw))

    # -- calls from the test process ------------------------------------------------
    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("netns is closed")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="netns",
                initializer=setns_net, initargs=(self.ns_path,),
            )
        return self._executor

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the namespace's thread and return its result
        (sockets it opens live in the namespace). Blocking; calls are serialized."""
        return self._pool().submit(fn, *args, **kwargs).result()

    async def acall(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` for async tests: awaits the namespace thread without blocking the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), functools.partial(fn, *args, **kwargs))

    # -- cleanup -------------------------------------------------------------------
    def pids_inside(self) -> list[int]:
        """Every process whose network namespace is this one (the holder included)."""
        out = []
        for proc in psutil.process_iter():
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == self.inode:
                    out.append(proc.pid)
            except (OSError, psutil.Error, AttributeError):
                continue
        return out

    def close(self) -> None:
        """Kill every process still inside (all ours: the namespace is private), then the
        holder; reap it; stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if getattr(self, "inode", None) is not None:
            others = []
            for pid in self.pids_inside():
                if pid == self.holder_pid:
                    continue
                try:
                    others.append(psutil.Process(pid))
                except psutil.Error:
                    pass
            kill_processes(others)
        kill_processes(process_tree(self.holder_pid))
        self._holder.wait(timeout=10)

    def __enter__(self) -> LoopbackNetns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class NodeSpec:
    """One ``ray start`` of the cluster. ``resources`` are custom resources (``accel`` stands
    in for a GPU); ``memory`` is Ray's logical memory resource, in bytes."""

    name: str
    num_cpus: int = 2
    memory: int = 2 * GIB
    resources: dict[str, float] = field(default_factory=dict)
    object_store_memory: int = 100 * 1024 * 1024
    port_base: int = 0  # set by the cluster: each node gets its own block of ports


@dataclass
class _Node:
    spec: NodeSpec
    proc: psutil.Process  # its ``ray start`` (a child of the launcher)
    log_path: Path

    def exited(self) -> bool:
        try:
            return bool(self.proc.status() == psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return True


#: The cluster's launcher: one long-lived process inside the namespace that starts each
#: ``ray start`` (one JSON line ``[args, log_path, env]`` in, its pid out) and reaps them.
#: Every Ray process is its descendant, so the leak guard's exemption is one pid that does
#: not change when a node is killed and restarted within a test.
_LAUNCHER = r"""
import json, os, subprocess, sys, threading, time
def reap():
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.1)
threading.Thread(target=reap, daemon=True).start()
for line in sys.stdin:
    args, log, env = json.loads(line)
    with open(log, "ab") as f:
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
    print(p.pid, flush=True)
"""


class RayTestCluster:
    """A head node and a second node on this machine, inside a ``LoopbackNetns``.

    ``RayTestCluster(temp_root)`` starts both and waits until the GCS sees 2 alive nodes.
    Every Ray process it starts descends from one launcher process (``launcher_pid``).
    ``owned`` (optional) is a set to which that pid is added while the cluster lives: pass
    the leak guard's registry (``tests.helpers.LONG_LIVED_PROCESSES``, whose descendants it
    ignores; Ray's raylets start and end workers as they like).
    """

    HEAD = "head"
    ACCEL = "accel-node"
    GCS_PORT = 6379

    def __init__(
        self,
        temp_root: str | os.PathLike[str] | None = None,
        *,
        head_memory: int = 2 * GIB,
        node_memory: int = 4 * GIB,
        node_resources: dict[str, float] | None = None,
        num_cpus: int = 2,
        netns: LoopbackNetns | None = None,
        owned: MutableSet[int] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self._own_netns = netns is None
        self.netns = netns or LoopbackNetns()
        self._owned = owned
        self._nodes: dict[str, _Node] = {}
        self._launcher: subprocess.Popen[str] | None = None
        try:
            self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir=temp_root))
            if len(str(self.temp_dir)) > MAX_TEMP_DIR_LEN:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir = Path(tempfile.mkdtemp(prefix="lemonade-ray", dir="/tmp"))
            self._launcher = self.netns.popen(
                [PYTHON, "-c", _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, env=self._env())
            self.launcher_pid = self._launcher.pid
            if self._owned is not None:
                self._owned.add(self.launcher_pid)
            self.specs = {
                self.HEAD: NodeSpec(self.HEAD, num_cpus=num_cpus, memory=head_memory,
                                    port_base=20000),
                self.ACCEL: NodeSpec(self.ACCEL, num_cpus=num_cpus, memory=node_memory,
                                     resources=dict(node_resources if node_resources
                                                    is not None else {"accel": 1}),
                                     port_base=22000),
            }
            t0 = time.monotonic()
            self._start(self.specs[self.HEAD])
            self._start(self.specs[self.ACCEL])
            self.wait_nodes(2, timeout=start_timeout)
            self.cold_start_s = time.monotonic() - t0
        except BaseException:
            self.close()
            raise

    # -- facts ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The GCS address, for ``ray.init(address=...)`` inside the namespace."""
        return f"127.0.0.1:{self.GCS_PORT}"

    def alive(self, name: str) -> bool:
        """Whether that node's ``ray start`` still runs (not killed)."""
        return name in self._nodes and not self._nodes[name].exited()

    def pid(self, name: str) -> int:
        """The pid of that node's ``ray start`` (the root of its process tree)."""
        return int(self._nodes[name].proc.pid)

    def node_pids(self, name: str) -> list[int]:
        """Every pid of that node's process tree now (ray start, gcs/raylet, workers)."""
        return [p.pid for p in process_tree(self.pid(name))]

    def rss_bytes(self, name: str | None = None) -> int:
        """Total RSS of one node's tree, or of both when ``name`` is None."""
        names = [name] if name else list(self._nodes)
        total = 0
        for n in names:
            for proc in process_tree(self.pid(n)):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def log(self, name: str) -> str:
        """What that node's ``ray start`` printed (for failure messages)."""
        return self._nodes[name].log_path.read_text(errors="replace")

    # -- drivers -------------------------------------------------------------------
    def driver(self, code: str, *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a Python driver script inside the namespace. ``ADDRESS`` (the GCS address)
        and ``json``/``ray`` are predefined; it runs ``ray.init(address=ADDRESS)`` first
        when the script does not call ``ray.init`` itself."""
        prelude = f"import json, ray\nADDRESS = {self.address!r}\n"
        if "ray.init(" not in code:
            prelude += "ray.init(address=ADDRESS, log_to_driver=False)\n"
        return self.netns.run([PYTHON, "-c", prelude + code], timeout=timeout,
                              env=self._env())

    def nodes(self, *, timeout: float = 120.0) -> list[dict[str, Any]]:
        """``ray.nodes()`` as a driver inside the namespace sees it (alive and dead)."""
        res = self.driver("print('NODES=' + json.dumps(ray.nodes(), default=str))",
                          timeout=timeout)
        for line in res.stdout.splitlines():
            if line.startswith("NODES="):
                return cast("list[dict[str, Any]]", json.loads(line[len("NODES="):]))
        raise RuntimeError(f"driver failed (rc {res.returncode}): {res.stderr[-3000:]}")

    @staticmethod
    def node_name(node: dict[str, Any]) -> str | None:
        """A ``ray.nodes()`` entry's name: its ``lemonade-node`` label, else NodeName."""
        return (node.get("Labels") or {}).get(NODE_LABEL) or node.get("NodeName")

    def wait_nodes(self, n: int, *, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Wait until ``n`` nodes are alive; return the alive entries of ``ray.nodes()``.
        Polls ``ray.nodes()`` in one driver (not a fresh driver per poll)."""
        code = (
            f"import time\ndeadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    alive = [x for x in ray.nodes() if x['Alive']]\n"
            f"    if len(alive) >= {n} or time.monotonic() > deadline: break\n"
            "    time.sleep(0.2)\n"
            "print('NODES=' + json.dumps(alive, default=str))\n"
        )
        deadline = time.monotonic() + timeout
        last = ""
        while not self.netns.call(_can_connect, "127.0.0.1", self.GCS_PORT):
            self._check_started()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the GCS did not listen within {timeout}s")
            time.sleep(0.2)
        while time.monotonic() < deadline:
            self._check_started()
            try:
                res = self.driver(code, timeout=max(5.0, deadline - time.monotonic() + 10))
            except subprocess.TimeoutExpired:
                break
            for line in res.stdout.splitlines():
                if line.startswith("NODES="):
                    alive = cast("list[dict[str, Any]]", json.loads(line[len("NODES="):]))
                    if len(alive) >= n:
                        return alive
            last = res.stderr[-3000:]
            time.sleep(0.5)  # the GCS may not be up yet: the driver could not connect
        raise TimeoutError(f"{n} alive Ray nodes not seen within {timeout}s; last driver "
                           f"stderr: {last}")

    def _check_started(self) -> None:
        for name, node in self._nodes.items():
            if node.exited():
                raise RuntimeError(f"ray start for {name} exited: "
                                   f"{self.log(name)[-3000:]}")

    def wait_dead(self, name: str, *, timeout: float = 60.0) -> float:
        """Wait until no alive node carries ``name``; return the seconds it took."""
        t0 = time.monotonic()
        code = (
            f"import time\ndeadline = time.monotonic() + {timeout}\n"
            "def name(x): return (x.get('Labels') or {}).get("
            f"{NODE_LABEL!r}) or x.get('NodeName')\n"
            "while time.monotonic() < deadline:\n"
            f"    if not any(x['Alive'] and name(x) == {name!r} for x in ray.nodes()):\n"
            "        print('DEAD'); break\n"
            "    time.sleep(0.1)\n"
        )
        res = self.driver(code, timeout=timeout + 60)
        if "DEAD" not in res.stdout:
            raise TimeoutError(f"node {name} still alive after {timeout}s: {res.stderr[-2000:]}")
        return time.monotonic() - t0

    # -- node lifecycle ------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HERMETIC_RAY_ENV)
        env["HOME"] = str(self.temp_dir)  # Ray keeps state in ~/.ray: never the user's
        env.pop("RAY_ADDRESS", None)
        return env

    def _args(self, spec: NodeSpec) -> list[str]:
        p = spec.port_base
        args = [
            str(RAY_BIN), "start", "--block",
            "--node-ip-address=127.0.0.1",
            f"--node-name={spec.name}",
            f"--labels={NODE_LABEL}={spec.name}",
            f"--num-cpus={spec.num_cpus}",
            "--num-gpus=0",
            f"--memory={spec.memory}",
            f"--object-store-memory={spec.object_store_memory}",
            f"--resources={json.dumps(spec.resources)}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # each node its own ports: two raylets share 127.0.0.1
            f"--node-manager-port={p}",
            f"--object-manager-port={p + 1}",
            f"--metrics-export-port={p + 2}",
            f"--dashboard-agent-listen-port={p + 3}",
            f"--dashboard-agent-grpc-port={p + 4}",
            f"--runtime-env-agent-port={p + 5}",
            f"--min-worker-port={p + 100}",
            f"--max-worker-port={p + 1999}",
        ]
        if spec.name == self.HEAD:
            args += ["--head", f"--port={self.GCS_PORT}", "--include-dashboard=false",
                     f"--system-config={json.dumps(FAST_FAILURE_CONFIG)}"]
        else:
            args += [f"--address={self.address}"]
        return args

    def _start(self, spec: NodeSpec) -> None:
        log_path = self.temp_dir / f"{spec.name}.ray-start.log"
        launcher = self._launcher
        assert launcher is not None and launcher.stdin and launcher.stdout
        launcher.stdin.write(json.dumps([self._args(spec), str(log_path), self._env()]) + "\n")
        launcher.stdin.flush()
        line = launcher.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the launcher did not start {spec.name}: {line!r}")
        self._nodes[spec.name] = _Node(spec, psutil.Process(int(line)), log_path)

    def kill_node(self, name: str = ACCEL) -> list[int]:
        """SIGKILL that node's whole process tree (collected first), reap; return the pids.
        The GCS then declares it dead (``wait_dead``)."""
        node = self._nodes[name]
        procs = process_tree(node.proc.pid)
        kill_processes(procs)  # the launcher reaps its ray start
        return [p.pid for p in procs]

    def restart_node(self, name: str = ACCEL, *, timeout: float = 120.0) -> None:
        """Start a killed (non-head) node again, same resources and name (a new node id);
        wait until 2 nodes are alive."""
        if name == self.HEAD:
            raise ValueError("restarting the head is not supported")
        node = self._nodes.get(name)
        if node is not None and not node.exited():
            self.kill_node(name)
        self._start(self.specs[name])
        self.wait_nodes(len(self.specs), timeout=timeout)

    def close(self) -> None:
        """Kill every tree it started (worker node first), by pid; reap; sweep anything
        left in the namespace; close the namespace if it made it; remove the temp dir."""
        for name in sorted(self._nodes, key=lambda n: n == self.HEAD):
            kill_processes(process_tree(self._nodes[name].proc.pid))
        self._nodes.clear()
        if self._launcher is not None:
            kill_processes(process_tree(self._launcher.pid))
            self._launcher.wait(timeout=10)
            for pipe in (self._launcher.stdin, self._launcher.stdout):
                if pipe is not None:
                    pipe.close()
            if self._owned is not None:
                self._owned.discard(self._launcher.pid)
            self._launcher = None
        if self._own_netns:
            self.netns.close()
        if getattr(self, "temp_dir", None) is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayTestCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
