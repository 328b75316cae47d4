"""Ray as the router's process launcher and node list.

:class:`RayBackend` connects this router to a Ray cluster as a driver, keeps the list of
nodes fresh (``ray.nodes()`` once a second, off the event loop), and launches a model's
worker on a chosen node: a :class:`~supervisor.cluster.worker_host.WorkerHost` actor pinned
to the node (``NodeAffinitySchedulingStrategy``, not soft) with the recipe's resources, which
starts ``python -m workers`` connecting back over TCP.

The protocol is the same msgpack stream as over the Unix socket. What replaces the Unix
socket's peer check (``SO_PEERCRED``: only the process we started may connect) is a
per-worker secret: 32 random bytes, given to the actor as a call argument (Ray's own
channel) and to the worker in its environment, which its hello must carry. The listener is
a fresh TCP port per worker on the address Ray knows this node by, open only until the
right hello arrives or the handshake deadline passes; a connection with a wrong or missing
secret is closed and logged and does not end the wait.

:class:`RemoteWorkerProcess` is what the rest of the router holds for such a worker: a
:class:`~supervisor.process.WorkerProcess` whose process is reached through its actor.
Its memory is what the worker reports (the router cannot read another machine's /proc);
stopping it signals through the actor, and the last step is always ``ray.kill``, which
ends the actor and with it the worker. Its exit watcher is one pending ``wait`` call on the
actor: the worker's exit status, or ``RayActorError`` when the actor or its whole node died.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from supervisor.cluster import nodes
from supervisor.cluster.worker_host import WorkerHost
from supervisor.config import Recipe, Settings
from supervisor.errors import GatewayTimeout, ServiceUnavailable, WorkerFailed
from supervisor.process import WorkerProcess
from supervisor.rundir import StartupError
from workers.protocol import MAX_WORKER_FRAME_BYTES, PROTOCOL_VERSION, Hello, ProtocolError
from workers.protocol import read_message as read_frame
from workers.runtime import TCP_PREFIX

log = logging.getLogger(__name__)

#: How often the node list is read again (a GCS call of a few ms).
REFRESH_INTERVAL_S = 1.0
#: After ``ray.kill``, how long to wait for Ray to confirm the actor's end before the
#: process counts as gone (a dead node's actors are confirmed only when the node is).
KILL_CONFIRM_S = 10.0
#: How long a head's address may take to accept a TCP connection at start.
HEAD_PROBE_S = 10.0
#: A worker whose connection ended gets this long to exit by itself before it is killed.
LINGER_S = 2.0
#: Actor threads: one always waits for the worker's exit; the others answer signal/tail.
_ACTOR_THREADS = 4


class RayBackend:
    """The router's connection to Ray: nodes, launching, shutting down."""

    def __init__(self, settings: Settings) -> None:
        self.address = str(settings.cluster)
        self.nodes: list[nodes.Node] = []
        #: The address workers connect back to: this node's address as Ray knows it.
        self.advertise_host = "127.0.0.1"
        self.resource_names = sorted({name for r in settings.models.values()
                                      for name in r.resources})
        self._host_class: Any = None
        self._renamed: set[str] = set()  # node ids already warned about (unique_names)
        self.refreshed_at = 0.0

    # ------------------------------------------------------------ connect / close

    def connect(self) -> None:
        """Join the cluster as a driver (blocking: called once, before serving)."""
        common: dict[str, Any] = {"namespace": "lemonade", "configure_logging": False,
                                  "log_to_driver": True}
        started = time.perf_counter()
        try:
            if self.address == "local":
                ray.init(include_dashboard=False, **common)
            else:
                _probe_head(self.address)
                ray.init(address=self.address, **common)
        except StartupError:
            raise
        except Exception as e:  # ConnectionError, RuntimeError: one line, not a traceback
            raise StartupError(f"cannot join the Ray cluster {self.address!r} (cluster "
                               f"setting): {_first_line(e)}") from None
        self.advertise_host = ray.util.get_node_ip_address()
        self._host_class = ray.remote(WorkerHost)
        self.refresh()
        log.info("joined the Ray cluster %s in %.1fs: %s", self.address,
                 time.perf_counter() - started,
                 ", ".join(f"{n.name} ({n.address})" for n in self.nodes if n.alive) or "no nodes")

    def refresh(self) -> None:
        found = [nodes.from_ray(raw) for raw in ray.nodes()]
        self.nodes = nodes.unique_names(found)
        self.refreshed_at = time.time()
        labels = {n.node_id: n.name for n in found}
        for node in self.nodes:
            if node.name != labels[node.node_id] and node.node_id not in self._renamed:
                self._renamed.add(node.node_id)
                log.warning("two live Ray nodes are called %s; the one with id %s is %s here",
                            labels[node.node_id], node.node_id, node.name)

    async def refresh_soon(self) -> None:
        """Read the node list now (an actor died: its node may be gone, and the next
        placement must not choose it)."""
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.refresh)

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                before = {n.name for n in self.alive_nodes()}
                await asyncio.to_thread(self.refresh)
                after = {n.name for n in self.alive_nodes()}
                for name in sorted(before - after):
                    log.warning("Ray node %s left the cluster", name)
                for name in sorted(after - before):
                    log.info("Ray node %s joined the cluster", name)
            except Exception as e:  # the GCS restarting must not end the loop
                log.warning("reading the Ray node list failed: %s", e)

    def close(self) -> None:
        # Our own driver connection only; a local instance we started ends with it. Never
        # ``ray stop``: that ends every Ray process on the machine.
        with contextlib.suppress(Exception):
            ray.shutdown()

    # ------------------------------------------------------------ nodes

    def alive_nodes(self) -> list[nodes.Node]:
        return [n for n in self.nodes if n.alive]

    def node(self, name: str) -> nodes.Node | None:
        """The live node of that name (a node that died and came back is listed twice)."""
        return next((n for n in self.nodes if n.name == name and n.alive), None)

    def nodes_for(self, recipe: Recipe) -> list[nodes.Node]:
        """Live nodes that have (in total) every resource the recipe asks for."""
        return [n for n in self.alive_nodes() if n.has(recipe.resources)]

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "backend": "ray",
                "nodes_read_at": self.refreshed_at,
                "nodes": [n.describe() for n in self.nodes]}

    # ------------------------------------------------------------ launching

    async def launch(self, recipe: Recipe, placement: str, *, handshake_timeout_s: float,
                     data_dir: str | None, max_concurrency: int) -> RemoteWorkerProcess:
        """Start the worker on the node ``placement`` names and take its hello."""
        name = nodes.node_of(placement)
        node = self.node(name or "")
        if node is None or not node.alive:
            raise ServiceUnavailable(f"Ray node {name!r} is not in the cluster any more",
                                     code="node_lost", retry_after_s=1)
        deadline = asyncio.get_running_loop().time() + handshake_timeout_s
        token = secrets.token_urlsafe(32)
        try:
            listener = socket.create_server((self.advertise_host, 0),
                                            family=_family(self.advertise_host), backlog=4)
        except OSError as e:
            raise ServiceUnavailable(f"could not open a port for the worker of "
                                     f"'{recipe.name}': {e}", code="spawn_failed",
                                     retry_after_s=5) from None
        listener.setblocking(False)
        host, port = listener.getsockname()[:2]
        connect = f"{TCP_PREFIX}{f'[{host}]' if ':' in host else host}:{port}"
        custom = {k: v for k, v in recipe.resources.items() if k != "GPU"}
        actor = self._host_class.options(
            num_cpus=0, num_gpus=recipe.resources.get("GPU", 0), resources=custom,
            max_concurrency=_ACTOR_THREADS, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote()
        handle = RayWorkerHandle(actor, node, on_actor_lost=self.refresh_soon)
        try:
            started = time.perf_counter()
            info = await _until(deadline, actor.start.remote(
                connect, recipe.kind, max_concurrency, data_dir, token),
                f"the worker of '{recipe.name}' to start on node {node.name}")
            handle.actor_seconds = time.perf_counter() - started
            handle.actor_pid = int(info["host_pid"])
            handle.watch(int(info["pid"]))
            reader, writer = await self._accept(listener, handle, token, deadline, recipe.name)
        except BaseException as e:
            handle.kill()
            if not isinstance(e, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(handle.wait(), KILL_CONFIRM_S)
                await self.refresh_soon()
            raise
        finally:
            listener.close()
        worker = RemoteWorkerProcess(recipe.name, handle, reader, writer)
        worker.hello_seconds = time.perf_counter() - started
        return worker

    async def _accept(self, listener: socket.socket, handle: RayWorkerHandle, token: str,
                      deadline: float, model: str
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The first connection whose hello carries ``token`` and the worker's pid."""
        loop = asyncio.get_running_loop()
        died = asyncio.ensure_future(handle.wait())
        try:
            while True:
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                left = deadline - loop.time()
                done, _ = await asyncio.wait({accept, died}, timeout=max(0.0, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    with contextlib.suppress(BaseException):
                        await accept
                    if died in done:
                        await handle.fetch_tail()
                        raise WorkerFailed(
                            f"worker for '{model}' on node {handle.node.name} "
                            f"{handle.describe_exit()} before connecting"
                            + (f": {handle.last_output()}" if handle.tail else ""))
                    raise GatewayTimeout(f"worker for '{model}' on node {handle.node.name} "
                                         f"did not connect in time")
                conn, peer = accept.result()
                reader, writer = await asyncio.open_connection(sock=conn)
                hello = await _read_hello(reader, max(0.1, deadline - loop.time()))
                if (isinstance(hello, Hello) and hello.token is not None
                        and hmac.compare_digest(hello.token.encode(), token.encode())
                        and hello.pid == handle.pid and hello.v == PROTOCOL_VERSION):
                    return reader, writer
                log.warning("refused a connection from %s to the worker port of %s: no valid "
                            "hello with its secret", peer, model)
                writer.close()
        finally:
            died.cancel()


class RayWorkerHandle:
    """A worker process on a Ray node, reached through its actor (``ProcessHandle``)."""

    def __init__(self, actor: Any, node: nodes.Node, *,
                 on_actor_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        self.actor = actor
        self._on_actor_lost = on_actor_lost
        self.node = node
        self.pid = 0
        self.actor_pid = 0  # the WorkerHost actor's own process, on the same node
        #: From asking Ray for the actor to the worker process started by it.
        self.actor_seconds = 0.0
        self.returncode: int | None = None
        self.lost_reason: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._exit: asyncio.Task[int] | None = None
        self._killed = asyncio.Event()

    def watch(self, pid: int) -> None:
        """The worker started with ``pid``: keep one ``wait`` call pending on the actor."""
        self.pid = pid
        self._exit = asyncio.ensure_future(self._watch(self.actor.wait.remote()))

    async def _watch(self, ref: Any) -> int:
        waiter = asyncio.ensure_future(_resolve(ref))
        killed = asyncio.ensure_future(self._killed.wait())
        try:
            done, _ = await asyncio.wait({waiter, killed}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                # We ended it: Ray confirms soon, or (its node is gone) when the node is
                # declared dead; either way the process is not ours to wait on forever.
                await asyncio.wait({waiter}, timeout=KILL_CONFIRM_S)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.returncode = int(waiter.result())
            else:
                error = None if not waiter.done() or waiter.cancelled() else waiter.exception()
                self.lost_reason = (f"its Ray actor ended ({type(error).__name__})"
                                    if error is not None else "its Ray actor was killed")
                self.returncode = -signal.SIGKILL
                if error is not None and self._on_actor_lost is not None:
                    # Before the crash is reported: the reload it leads to must see the
                    # node list as it is now (the node may be gone with the actor).
                    await self._on_actor_lost()
        finally:
            for fut in (waiter, killed):
                fut.cancel()
        return self.returncode

    async def wait(self) -> int:
        if self._exit is None:  # the worker never started: only the actor existed
            await self._killed.wait()
            self.returncode = -signal.SIGKILL
            return self.returncode
        return await asyncio.shield(self._exit)

    def kill(self) -> None:
        """End the actor, and with it the worker (``PR_SET_PDEATHSIG``)."""
        self._killed.set()
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(Exception):
            self.actor.signal.remote(int(sig))

    async def fetch_tail(self) -> None:
        with contextlib.suppress(Exception):
            lines = await asyncio.wait_for(_resolve(self.actor.tail.remote()), 2.0)
            self.tail.extend(lines)

    def describe_exit(self) -> str:
        if self.lost_reason is not None:
            return self.lost_reason
        code = self.returncode
        if code is None:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def last_output(self, lines: int = 5) -> str:
        return " | ".join(list(self.tail)[-lines:])


class RemoteWorkerProcess(WorkerProcess):
    """A worker on a cluster node: the same channel, a different process handle."""

    remote = True

    def __init__(self, model: str, handle: RayWorkerHandle, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        super().__init__(model, handle, reader, writer, handle.tail, [])
        self._ps = None  # its pid is another machine's: never read this machine's /proc
        self.handle = handle
        self.node = handle.node.name
        self.started_by = "ray"
        self._reported_rss = 0
        self._linger: asyncio.Future[None] | None = None

    def note_reported_memory(self, memory: Mapping[str, int]) -> None:
        self._reported_rss = int(memory.get("rss", 0) or 0)

    def rss_bytes(self) -> int:
        return self._reported_rss if self.alive else 0

    def freed_on_exit_bytes(self) -> int:
        return self.rss_bytes()

    def describe_exit(self) -> str:
        return self.handle.describe_exit()

    def connection_lost(self, reason: str) -> None:
        # The TCP connection is the only way to use this worker: without it the process
        # would hold its node's memory for nothing (a partition, a hung node). A worker
        # that was told to shut down closes it too, and exits at once; one still there
        # after LINGER_S is ended through its actor.
        if self._linger is None:
            self._linger = asyncio.ensure_future(self._end_if_lingering(reason))

    async def _end_if_lingering(self, reason: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), LINGER_S)
        except TimeoutError:
            log.warning("lost the connection to the worker of %s on node %s (%s) and it did "
                        "not exit; ending it", self.model, self.node, reason)
            self.handle.kill()

    def kill(self) -> None:
        self.handle.kill()

    async def _stop(self, grace_s: float) -> int:
        try:
            for sig in (None, signal.SIGTERM):
                if sig is not None:
                    self.handle.signal(sig)
                try:
                    await asyncio.wait_for(asyncio.shield(self.exited), grace_s / 2)
                    break
                except TimeoutError:
                    continue
        finally:
            self.handle.kill()  # the actor too, whatever the worker did
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.exited), KILL_CONFIRM_S + 2)
        return self.proc.returncode if self.proc.returncode is not None else -signal.SIGKILL


def _probe_head(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at a head's ``HOST:PORT`` (Ray's own
    connect retries for minutes). Ray Client and "auto" addresses are left to Ray."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=HEAD_PROBE_S):
            pass
    except OSError as e:
        raise StartupError(f"cannot join the Ray cluster {address!r} (cluster setting): "
                           f"nothing answers there ({e.strerror or e}); start its head with "
                           f"`ray start --head --port={port}`, or check the address") from None


async def _resolve(ref: Any) -> Any:
    """Await a Ray ObjectRef from asyncio."""
    return await ref


async def _until(deadline: float, ref: Any, what: str) -> Any:
    left = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(_resolve(ref), max(0.0, left))
    except TimeoutError:
        raise GatewayTimeout(f"timed out waiting for {what} (is a node with its resources "
                             f"free? Ray keeps the actor pending until one is)") from None
    except ray.exceptions.RayActorError as e:
        # The actor could not be placed or died on the way: its node left, most likely.
        # Not the model's fault, so a 503 to retry (no load failure, no cooldown).
        raise ServiceUnavailable(f"{what} failed: its Ray actor died ({_first_line(e)})",
                                 code="node_lost", retry_after_s=1) from None
    except ray.exceptions.RayError as e:
        raise WorkerFailed(f"{what} failed in Ray: {_first_line(e)}") from None


async def _read_hello(reader: asyncio.StreamReader, timeout_s: float) -> object:
    try:
        return await asyncio.wait_for(
            read_frame(reader, {Hello.T: Hello}, max_frame=MAX_WORKER_FRAME_BYTES), timeout_s)
    except (ProtocolError, TimeoutError, ConnectionError, OSError):
        return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
