"""Zygotes: per-kind template processes that fork workers (the supervisor's side).

A spawned worker spends seconds importing torch and friends before it reads a weight; a
worker forked from a zygote (:mod:`workers.zygote`) starts with them imported. A
:class:`Zygote` starts one such process, asks it to fork, and hands
:mod:`supervisor.process` a handle that behaves like the asyncio ``Process`` of a spawned
worker (``pid``, ``returncode``, ``wait()``), so everything after the start (socket
handshake, peer pid check, stop, kill the process group, reap, crash detection) is the same
code for both. Which zygotes run, and what happens when one cannot fork, is the job of
:mod:`supervisor.zygote_pool`.

A zygote holds a few hundred MB of imported modules, so it does not outlive its use: when it
has had no live worker (no forked child alive, no fork in progress) for ``idle_timeout_s``
it tells its owner, which stops it. The timer is a generation-stamped ``call_later``
(:class:`supervisor.lifecycle.IdleTimer`), armed when the last child exits or the zygote
becomes ready with none, cancelled when a fork is asked for, and re-checked when it fires.

Exit statuses: the zygote is the forked worker's parent, so it reaps it and reports the
status. The supervisor also holds a pidfd for each worker (sent by the zygote, opened before
the child could be reaped), which tells it the worker is gone even if its zygote died first
(a zygote's death kills its workers through their parent-death signal).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from supervisor import process
from supervisor.lifecycle import IdleTimer
from workers.zygote_protocol import ZygoteProtocolError, decode, encode, receive, send

log = logging.getLogger(__name__)

#: How long to wait for a zygote's exit report once a worker's pidfd says it is gone.
_EXIT_REPORT_GRACE_S = 2.0
_STOP_GRACE_S = 2.0


def fork_unavailable_reason() -> str | None:
    """Why this platform cannot fork workers from zygotes, or None."""
    if not sys.platform.startswith("linux"):
        return "zygotes need Linux (pidfds, PR_SET_PDEATHSIG)"
    if not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        return "this Python lacks os.pidfd_open or socket.send_fds"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as e:
        return f"the kernel refuses pidfd_open ({e.strerror}); Linux 5.3 or later is needed"
    return None


class ForkedProcess:
    """A worker forked by a zygote, with the interface of ``asyncio.subprocess.Process``
    that :mod:`supervisor.process` uses: ``pid``, ``returncode`` and ``wait()``."""

    def __init__(self, pid: int, pidfd: int, zygote: Zygote) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._zygote = zygote
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = pidfd
        self._loop.add_reader(pidfd, self._on_gone)

    def _on_gone(self) -> None:
        self._close_pidfd()
        if self._zygote.alive:
            # The zygote reaps it and reports the status in a moment.
            self._loop.call_later(_EXIT_REPORT_GRACE_S, self.finish, -signal.SIGKILL)
        else:
            self.finish(-signal.SIGKILL)  # killed by its parent-death signal

    def finish(self, code: int) -> None:
        if self._exited.done():
            return
        self._close_pidfd()
        self.returncode = code
        self._exited.set_result(code)
        self._zygote._child_finished(self)

    def kill(self) -> None:
        """SIGKILL exactly this process, through its pidfd (no pid reuse can misdirect it)."""
        if self._pidfd is not None and not self._exited.done():
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def zygote_died(self) -> None:
        """Its zygote is gone, so it dies too (parent-death signal); wait for the pidfd."""
        if self._pidfd is None:
            self.finish(-signal.SIGKILL)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


@dataclass
class ForkedWorker:
    """What a fork gives :mod:`supervisor.process`: the process and its output streams."""

    proc: ForkedProcess
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    #: ``time.perf_counter()`` when the fork was asked for (after any zygote start).
    requested_at: float


class Zygote:
    """One template process for one kind, and the control socket to it.

    ``on_lost(zygote)``: it died unexpectedly after it was ready. ``on_idle(zygote,
    idle_s)``: it has had no live worker for ``idle_timeout_s`` (``math.inf``: never); the
    owner decides whether to stop it.
    """

    def __init__(self, kind: str, env: dict[str, str],
                 on_lost: Callable[[Zygote], None] | None = None, *,
                 idle_timeout_s: float = math.inf,
                 on_idle: Callable[[Zygote, float], None] | None = None) -> None:
        self.kind = kind
        self._env = env
        self._on_lost = on_lost
        self._on_idle = on_idle
        self.idle_timeout_s = idle_timeout_s
        self._idle = IdleTimer(self._idle_expired)
        self._idle_since: float | None = None  # time.monotonic() when it last had no worker
        self.pid: int | None = None
        self.import_s: float | None = None
        self.learned_modules = 0
        self.tainted = False
        self.learning = False  # a "learn" is out and its "learned" has not come back
        self.unsafe: str | None = None
        self.forks = 0
        self.started_at: float | None = None
        #: Its idle timer ran out (the owner stops it); an expected end, not a failure.
        self.idle_exited = False
        self._proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._ready: asyncio.Future[Any] | None = None
        self._pending: dict[int, asyncio.Future[ForkedProcess | str]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._next_id = 0
        self._forwarders: list[asyncio.Task[None]] = []
        self.output_tail: collections.deque[str] = collections.deque(maxlen=20)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and (
            self._control is not None)

    async def start(self, timeout_s: float) -> None:
        """Start the process and wait until it has imported its modules ("ready")."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await process._create_worker_process(
                sys.executable, "-m", "workers.zygote", "--kind", self.kind,
                "--control-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, env=self._env,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self._proc.pid
        ours.setblocking(False)
        self._control = ours
        self._ready = loop.create_future()
        name = f"zygote {self.kind}"
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._forwarders = [
            asyncio.create_task(process.forward_output(name, stream, self.output_tail))
            for stream in (self._proc.stdout, self._proc.stderr)
        ]
        loop.add_reader(ours, self._on_readable)
        watcher: asyncio.Future[Any] = asyncio.ensure_future(self._proc.wait())
        try:
            done, _ = await asyncio.wait({self._ready, watcher}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if self._ready not in done:
                raise RuntimeError(
                    "exited before it was ready" if watcher in done
                    else f"not ready within {timeout_s:g}s")
            ready = self._ready.result()
        except BaseException:
            await self.stop()
            raise
        finally:
            watcher.cancel()
        self.import_s = ready["import_s"]
        self.unsafe = ready["unsafe"]
        self.learned_modules = ready["learned"]
        # Unsafe only because of the learned imports (the zygote set that list aside): a new
        # zygote of this kind starts without it and may fork again.
        self.tainted = self.unsafe is not None and self.learned_modules > 0
        self.started_at = time.time()
        self._watcher = asyncio.ensure_future(self._watch())
        self._settle()  # ready with no child yet (an eager start, or a fork that follows)

    async def _watch(self) -> None:
        assert self._proc is not None
        await self._proc.wait()
        self._lost(f"exited with code {self._proc.returncode}")

    def _on_readable(self) -> None:
        control = self._control
        while control is not None:
            try:
                record, fds = receive(control)
            except BlockingIOError:
                return
            except (OSError, ZygoteProtocolError) as e:
                self._lost(f"control socket failed: {e}")
                return
            if not record:
                self._lost("ended (its control socket closed)")
                return
            try:
                self._dispatch(decode(record, fds), fds)
            except ZygoteProtocolError as e:
                log.error("zygote %s for kind %s broke the protocol (%s); killing it",
                          self.pid, self.kind, e)
                self._kill()
                self._lost("broke the protocol")
                return

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        kind = message["t"]
        if kind == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(message)
        elif kind == "forked":
            future = self._pending.pop(message["id"], None)
            if future is None or future.done():
                os.close(fds[0])  # its request was cancelled; the worker finds no listener
                return
            # Registered before anything else runs, so its "exited" (which may be the next
            # record in this very read) finds it.
            child = ForkedProcess(message["pid"], fds[0], self)
            self._children[child.pid] = child
            future.set_result(child)
        elif kind == "fork_failed":
            future = self._pending.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message["error"])
            self._settle()
        elif kind == "exited":
            gone = self._children.get(message["pid"])
            if gone is not None:
                gone.finish(message["code"])  # which forgets it (_child_finished)
        elif kind == "learned":
            self._learned(message)
        else:
            raise ZygoteProtocolError(f"unexpected {kind} from a zygote")

    def learn(self) -> None:
        """A worker of this kind finished loading: the zygote imports what its load learned
        (:mod:`workers.import_manifest`), so that the next worker starts with it."""
        if self.alive and self.unsafe is None and self._control is not None:
            try:
                send(self._control, encode("learn"))
                self.learning = True
            except OSError as e:  # full or gone: the next worker's load teaches it again
                log.debug("could not ask zygote %s to learn: %s", self.pid, e)

    def _learned(self, message: dict[str, Any]) -> None:
        self.learning = False
        self.learned_modules += message["modules"]
        if message["modules"] or message["failed"]:
            log.info("zygote %s for kind %s imported %d modules its workers' loads use "
                     "(%.2fs%s)", self.pid, self.kind, message["modules"], message["seconds"],
                     f", {message['failed']} no longer import" if message["failed"] else "")
        if message["unsafe"] is not None and self.unsafe is None:
            self.unsafe = message["unsafe"]
            self.tainted = True
            log.warning("zygote %s for kind %s cannot fork any more: %s", self.pid, self.kind,
                        self.unsafe)

    def _lost(self, why: str, *, expected: bool = False) -> None:
        if self._control is None:
            return
        self._idle.cancel()
        self._idle_since = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._control)
        self._control.close()
        self._control = None
        for future in self._pending.values():
            if not future.done():
                future.set_result(f"zygote {why}")
        self._pending.clear()
        children = list(self._children.values())
        self._children.clear()  # before they finish: finishing forgets a child
        for child in children:
            child.zygote_died()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(why))
            self._ready.exception()  # start() reports it; nobody else needs to retrieve it
        log.log(logging.DEBUG if expected else logging.WARNING,
                "zygote %s for kind %s %s%s", self.pid, self.kind, why,
                f" (last output: {' | '.join(self.output_tail)})" if self.output_tail else "")
        if not expected and self.started_at is not None and self._on_lost is not None:
            self._on_lost(self)

    # ------------------------------------------------------------------ idle exit

    @property
    def workers(self) -> int:
        """Forked children still alive (their exit not reported yet)."""
        return len(self._children)

    def _child_finished(self, child: ForkedProcess) -> None:
        if self._children.get(child.pid) is child:
            del self._children[child.pid]
            self._settle()

    def _settle(self) -> None:
        """Arm the idle timer when no worker is alive and no fork is in progress; otherwise
        cancel it. An armed timer keeps its deadline (it counts from the last child's exit)."""
        if not self.alive or self._children or self._pending:
            self._idle.cancel()
            self._idle_since = None
            return
        if self._idle.armed or math.isinf(self.idle_timeout_s):
            return
        self._idle_since = time.monotonic()
        self._idle.arm(self.idle_timeout_s)

    def _idle_expired(self, generation: int) -> None:
        if generation != self._idle.generation:
            return  # cancelled (a fork was asked for) after this timer was scheduled
        self._idle.cancel()
        if not self.alive or self._children or self._pending:
            return
        idle_s = time.monotonic() - (self._idle_since or time.monotonic())
        self._idle_since = None
        self.idle_exited = True
        if self._on_idle is not None:
            self._on_idle(self, idle_s)

    def idle_expires_in_s(self) -> float | None:
        """Seconds until the idle exit is due, or None when none is scheduled."""
        if self._idle.expires_at is None:
            return None
        return max(0.0, self._idle.expires_at - time.time())

    async def fork(self, socket_path: str, max_threads: int) -> ForkedWorker | str:
        """Fork one worker; a string says why it could not be done."""
        if not self.alive or self._control is None:
            return "zygote is not running"
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[ForkedProcess | str] = loop.create_future()
        self._pending[request_id] = future
        self._settle()  # a fork in progress: no idle exit now
        requested_at = time.perf_counter()
        try:
            send(self._control,
                 encode("fork", id=request_id, socket=socket_path, max_threads=max_threads),
                 (out_w, err_w))
            outcome = await future
        except (OSError, asyncio.CancelledError) as e:
            self._pending.pop(request_id, None)
            self._settle()
            os.close(out_r)
            os.close(err_r)
            if isinstance(e, asyncio.CancelledError):
                # The fork may still happen; the zygote reports the child's exit and its
                # pidfd is closed on arrival, and the worker exits when nobody connects.
                raise
            return f"could not ask the zygote: {e}"
        finally:
            os.close(out_w)
            os.close(err_w)
        if isinstance(outcome, str):
            os.close(out_r)
            os.close(err_r)
            return outcome
        self.forks += 1
        return ForkedWorker(outcome, await _reader(out_r), await _reader(err_r), requested_at)

    def rss_bytes(self) -> int:
        if self.pid is None or not self.alive:
            return 0
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def unique_bytes(self) -> int:
        """Its unique set size (USS): roughly what its exit frees once no worker shares its
        pages; its RSS where USS cannot be read."""
        if self.pid is None or not self.alive:
            return 0
        try:
            return int(psutil.Process(self.pid).memory_full_info().uss)
        except (psutil.Error, AttributeError):
            return self.rss_bytes()

    def _kill(self) -> None:
        if self._proc is not None:
            process.signal_group(self._proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Close the control socket (the zygote exits on EOF), then make sure it is gone."""
        self._lost("stopped by the supervisor", expected=True)
        if self._proc is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), _STOP_GRACE_S)
            except TimeoutError:
                pass
            await process.kill_group_and_reap(self._proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._forwarders), 1.0)

    def describe(self) -> dict[str, Any]:
        expires_in = self.idle_expires_in_s()
        return {
            "kind": self.kind, "pid": self.pid if self.alive else None,
            "state": ("unsafe" if self.unsafe else "ready") if self.alive else "stopped",
            "unsafe_reason": self.unsafe, "import_seconds": self.import_s,
            "learned_modules": self.learned_modules, "learning": self.learning,
            "forks": self.forks,
            "workers": self.workers, "rss_bytes": self.rss_bytes(),
            "idle_expires_in_s": None if expires_in is None else round(expires_in, 3),
        }


async def _reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader
