"""Spawn, handshake, stop and reap one worker process.

A worker is ``python -m workers`` in its own session (so its whole process group can be
killed), with an allowlisted environment, either spawned here or forked by its kind's zygote
(:mod:`supervisor.zygote_pool`); from the socket handshake on, both are handled by the same code.
It connects back to a Unix socket that only it may use: the socket lives in the supervisor's
private 0700 runtime directory, is created 0600, accepts exactly one connection, checks the
peer's pid with ``SO_PEERCRED``, and is unlinked as soon as the worker is connected. The
worker's stdout and stderr are forwarded to the log with a ``[model]`` prefix by
:mod:`supervisor.worker_output` (levels kept, progress bars turned into load progress), and
the last lines are kept for error messages.

Stopping is written so it cannot be skipped: ``stop()`` runs as its own task (callers shield
it) and always ends with the group killed and the process reaped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from supervisor.errors import GatewayTimeout, ServiceUnavailable, WorkerFailed
from supervisor.worker_output import BarSink
from supervisor.worker_output import forward_output as forward_output  # zygote.py uses it
from workers.protocol import (
    MAX_WORKER_FRAME_BYTES,
    PROTOCOL_VERSION,
    Hello,
    ProtocolError,
    read_message,
)

if TYPE_CHECKING:
    from supervisor.zygote_pool import ZygotePool

log = logging.getLogger(__name__)

#: Environment variables a worker may see; everything else (API keys, tokens, proxies) is
#: dropped. Prefixes cover the thread, GPU and model-cache knobs users rely on.
ENV_ALLOW = frozenset(
    {"PATH", "HOME", "USER", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
     "LD_LIBRARY_PATH", "LEMONADE_LOG_LEVEL", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"}
)
ENV_ALLOW_PREFIXES = (
    "LC_", "CUDA_", "NVIDIA_", "HIP_", "ROCM_", "OMP_", "MKL_", "OPENBLAS_", "TORCH_", "HF_",
    "XDG_", "COVERAGE_",
)
_SUN_PATH_MAX = 107
_STDERR_TAIL_LINES = 40


def worker_environment(
    source: dict[str, str] | None = None, *, data_dir: str | None = None
) -> dict[str, str]:
    env = os.environ if source is None else source
    out = {
        k: v for k, v in env.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES)
    }
    out["PYTHONUNBUFFERED"] = "1"
    # Offline unless the user says otherwise (HF_HUB_OFFLINE=0 lets a recipe name a hub repo):
    # on a closed network a hub call must fail fast, not hang.
    out.setdefault("HF_HUB_OFFLINE", "1")
    if data_dir is not None:
        out["LEMONADE_DATA_DIR"] = data_dir  # the supervisor's own value, not the user's env
    return out


class WorkerProcess:
    """One running worker: process, connected socket streams, output forwarders."""

    #: A worker on another machine (supervisor/cluster/ray_backend.py): its pid is not one
    #: of this machine's.
    remote = False

    def __init__(
        self,
        model: str,
        proc: ProcessHandle,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        output_tail: collections.deque[str],
        forwarders: list[asyncio.Task[None]],
    ) -> None:
        self.model = model
        self.proc = proc
        self.pid = proc.pid
        self.reader = reader
        self.writer = writer
        self.output_tail = output_tail
        self._forwarders = forwarders
        #: "spawn" or "fork", and seconds from asking for the process (the spawn, or the
        #: fork request to a running zygote) to its hello.
        self.started_by = "spawn"
        self.hello_seconds = 0.0
        self.exited: asyncio.Task[int] = asyncio.ensure_future(self._wait())
        self._stop_task: asyncio.Task[int] | None = None
        try:
            self._ps: psutil.Process | None = psutil.Process(self.pid)
        except psutil.Error:
            self._ps = None

    # ----------------------------------------------------------------- spawn

    @classmethod
    async def spawn(
        cls,
        *,
        model: str,
        kind: str,
        runtime_dir: Path,
        seq: int,
        handshake_timeout_s: float,
        max_concurrency: int = 1,
        env: dict[str, str] | None = None,
        data_dir: str | None = None,
        zygotes: ZygotePool | None = None,
        on_bar: BarSink | None = None,
    ) -> WorkerProcess:
        """Start (or fork) the worker and take its hello; ``on_bar`` gets the progress bars
        it draws on its output (see :mod:`supervisor.worker_output`)."""
        path = runtime_dir / f"{model}.{seq}.sock"
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            # Keep the name short but unique; the model name is only for humans here.
            path = runtime_dir / f"w{seq}.sock"
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE, ENFILE, ENOBUFS
            raise _spawn_failed(model, e) from None
        try:
            old_umask = os.umask(0o177)  # born 0600: no window between bind and chmod
            try:
                listener.bind(os.fspath(path))
            finally:
                os.umask(old_umask)
            listener.listen(1)
            listener.setblocking(False)
        except OSError as e:
            listener.close()
            raise _spawn_failed(model, e) from None
        tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        proc: ProcessHandle | None = None
        forwarders: list[asyncio.Task[None]] = []
        conn: socket.socket | None = None
        try:
            started = time.perf_counter()
            forked = None
            if zygotes is not None and env is None:  # a custom env needs a fresh interpreter
                forked = await zygotes.fork(kind, os.fspath(path), max_concurrency)
            streams: tuple[asyncio.StreamReader | None, ...]
            if forked is not None:
                proc, streams = forked.proc, (forked.stdout, forked.stderr)
                started = forked.requested_at  # a zygote's own start is logged on its own
            else:
                spawned = await _spawn_process(model, kind, path, max_concurrency,
                                               worker_environment(data_dir=data_dir)
                                               if env is None else env)
                proc, streams = spawned, (spawned.stdout, spawned.stderr)
            forwarders = [asyncio.create_task(forward_output(model, stream, tail, on_bar=on_bar))
                          for stream in streams if stream is not None]
            conn = await _accept_from(listener, proc, handshake_timeout_s, model, tail)
            reader, writer = await asyncio.open_unix_connection(sock=conn)
            conn = None  # owned by the streams now
            try:
                hello = await asyncio.wait_for(
                    read_message(reader, {Hello.T: Hello}, max_frame=MAX_WORKER_FRAME_BYTES),
                    handshake_timeout_s,
                )
            except (ProtocolError, TimeoutError) as e:
                writer.close()
                raise WorkerFailed(f"worker for '{model}' sent no valid hello: {e}") from None
            if not isinstance(hello, Hello) or hello.pid != proc.pid or hello.v != PROTOCOL_VERSION:
                writer.close()
                raise WorkerFailed(
                    f"worker for '{model}' sent a bad hello (pid/version mismatch): {hello!r:.200}"
                )
            worker = cls(model, proc, reader, writer, tail, forwarders)
            worker.started_by = "fork" if forked is not None else "spawn"
            worker.hello_seconds = time.perf_counter() - started
            log.debug("worker %d for %s connected (%s, hello after %.0f ms)", proc.pid, model,
                      worker.started_by, worker.hello_seconds * 1000)
            return worker
        except BaseException:
            if conn is not None:
                conn.close()
            if proc is not None:
                await kill_group_and_reap(proc)
            for task in forwarders:
                task.cancel()
            raise
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ----------------------------------------------------------------- state

    async def _wait(self) -> int:
        code = await self.proc.wait()
        # The output pipes close with the process; let the forwarders flush the last lines.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._forwarders), 1.0)
        return code

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def note_reported_memory(self, memory: dict[str, int]) -> None:
        """What the worker said it holds (its load reply, each pong). A local worker is
        measured here instead (:meth:`rss_bytes`); a remote one has only this."""

    def connection_lost(self, reason: str) -> None:
        """The socket ended while the process may live. Locally nothing to do: the process
        ends on EOF, and the exit watcher sees it through ``waitpid``."""

    def last_output(self, lines: int = 5) -> str:
        return " | ".join(list(self.output_tail)[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of the worker and any children it started (psutil)."""
        return self._tree_bytes(lambda p: int(p.memory_info().rss)) or 0

    def _tree_bytes(self, measure: Callable[[psutil.Process], int]) -> int | None:
        """``measure`` summed over the worker and its children; None if it cannot be read."""
        if self._ps is None or not self.alive:
            return 0
        try:
            total = measure(self._ps)
            for child in self._ps.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += measure(child)
        except psutil.Error:
            return None
        return total

    def freed_on_exit_bytes(self) -> int:
        """Memory that ending this worker would give back: what the planner charges for it.

        A spawned worker's RSS. A forked worker shares its zygote's pages (the imported
        modules, hundreds of MB) copy-on-write; its RSS counts them, but they stay with the
        zygote when it exits. Its unique set size (USS, from ``/proc/<pid>/smaps_rollup``) is
        what it really holds, and the zygote's own memory is charged once, to the pool.
        """
        if self.started_by != "fork":
            return self.rss_bytes()
        uss = self._tree_bytes(lambda p: int(p.memory_full_info().uss))
        return self.rss_bytes() if uss is None else uss

    # ----------------------------------------------------------------- stop

    def stop(self, grace_s: float) -> asyncio.Task[int]:
        """Start (or join) the stop; the task always ends with the process reaped.

        The caller has already sent ``shutdown`` if it could. We wait half the grace for a
        clean exit, SIGTERM the group, wait the other half, then SIGKILL the group.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(grace_s))
        return self._stop_task

    async def _stop(self, grace_s: float) -> int:
        try:
            for sig in (None, signal.SIGTERM):
                if sig is not None:
                    signal_group(self.pid, sig)
                try:
                    await asyncio.wait_for(asyncio.shield(self.exited), grace_s / 2)
                    break
                except TimeoutError:
                    continue
        finally:
            code = await kill_group_and_reap(self.proc)
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.exited), 2.0)
        return code

    def kill(self) -> None:
        """SIGKILL the group now (used when the worker broke the protocol or hung)."""
        signal_group(self.pid, signal.SIGKILL)


# --------------------------------------------------------------------- helpers


class ProcessHandle(Protocol):
    """What this module needs of a worker process: asyncio's ``Process`` for a spawned
    worker, :class:`supervisor.zygote.ForkedProcess` for a forked one."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def kill(self) -> None: ...

    async def wait(self) -> int: ...


async def _spawn_process(
    model: str, kind: str, path: Path, max_concurrency: int, env: dict[str, str]
) -> asyncio.subprocess.Process:
    try:
        return await _create_worker_process(
            sys.executable, "-m", "workers",
            "--socket", os.fspath(path), "--kind", kind,
            "--parent-pid", str(os.getpid()), "--max-threads", str(max_concurrency),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
    except OSError as e:  # EAGAIN from fork, EMFILE for the pipes, ENOMEM
        raise _spawn_failed(model, e) from None

#: The one place workers are started (a name tests can point at a failing fake, as they do
#: for fork failures: ``BlockingIOError`` from ``create_subprocess_exec``).
_create_worker_process = asyncio.create_subprocess_exec


def _spawn_failed(model: str, error: OSError) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"could not start a worker for '{model}': {error.strerror or error}",
        code="spawn_failed", retry_after_s=5,
    )



async def _accept_from(
    listener: socket.socket,
    proc: ProcessHandle,
    timeout_s: float,
    model: str,
    tail: collections.deque[str],
) -> socket.socket:
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    died = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait({accept, died}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if accept in done:
            conn, _ = accept.result()
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            if pid != proc.pid or uid != os.getuid():
                conn.close()
                raise WorkerFailed(
                    f"a process other than the worker for '{model}' connected to its socket"
                )
            return conn
        if died in done:
            await asyncio.sleep(0.05)  # let the forwarders catch the last lines
            detail = " | ".join(list(tail)[-5:])
            raise WorkerFailed(
                f"worker for '{model}' exited with code {proc.returncode} before connecting"
                + (f": {detail}" if detail else "")
            )
        raise GatewayTimeout(f"worker for '{model}' did not connect within {timeout_s:g}s")
    finally:
        for fut in (accept, died):
            if not fut.done():
                fut.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(accept, died, return_exceptions=True)


def signal_group(pid: int, sig: signal.Signals) -> None:
    # The worker leads its own session, so its pgid is its pid. While any member of the group
    # lives, the kernel does not hand that id to a new process, so this cannot hit a stranger.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def kill_group_and_reap(proc: ProcessHandle) -> int:
    signal_group(proc.pid, signal.SIGKILL)
    # The process itself too: a worker just forked by a zygote may not have called setsid()
    # yet, so its group does not exist and killpg misses it. Left alive, it would connect,
    # wait for a load that never comes, and this reap would never end (found by the
    # liveness soak). ``kill()`` names exactly this process (a pidfd for a forked one).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.kill()
    return await proc.wait()
