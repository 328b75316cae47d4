"""A zygote: a template process per worker kind that forks fresh workers on request.

A new Python worker pays for its interpreter and its imports (``import torch`` 2 s,
``import kokoro`` several more on this machine) before it reads one weight. A zygote pays
that once: it imports the kind's modules (:meth:`workers.base.Model.prepare_zygote`), then
waits on its control socket. For every ``fork`` the supervisor sends, it forks a child that
becomes an ordinary worker, running the same :func:`workers.runtime.main` a spawned one does,
so a reload costs only the weights. Unloading still ends the worker's process, which hands
every byte (CUDA context included) back.

What keeps forking safe:

* the zygote never loads weights, never touches CUDA and never runs a parallel op, so no
  thread pool or driver state is copied into a child half-initialised. It checks this after
  its imports (no second Python thread, CUDA not initialised) and reports ``unsafe`` instead
  of forking when the check fails; the supervisor then spawns that kind's workers plainly.
  The same check runs again after it imports the modules its workers' loads were seen to
  import (:mod:`workers.import_manifest`), at start and on each ``learn``; a manifest that
  fails it is set aside, so the kind's next zygote starts without it;
* it is single-threaded and runs no event loop: a blocking ``select`` over the control
  socket and a self-pipe for ``SIGCHLD``;
* a child starts its own session (own process group, so the supervisor can kill the group),
  arms ``PR_SET_PDEATHSIG`` against the zygote, takes the stdout and stderr pipes the
  supervisor sent for it, closes the zygote's descriptors and only then runs the worker.

Lifetime: the zygote's own parent-death signal fires when the supervisor dies, and each
worker's fires when its zygote dies, so no process outlives the supervisor. The zygote reaps
its children and reports each exit status (``exited``); it exits when the control socket
closes.

Run by the supervisor as ``python -m workers.zygote --kind K --control-fd N --parent-pid P``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

from workers import import_manifest, proctitle, registry, runtime, zygote_protocol
from workers.zygote_protocol import ZygoteProtocolError

log = logging.getLogger("workers.zygote")

EXIT_IMPORT_FAILED = 4


def fork_hazard(python_threads: int, cuda_initialized: bool) -> str | None:
    """Why forking this process would be unsafe, or None when it is safe.

    A second Python thread may hold a lock (the import lock, a logging lock, the GIL state
    of a C extension) at the instant of the fork; the child would deadlock on it. A CUDA
    context cannot be used in a forked child at all.
    """
    if cuda_initialized:
        return "CUDA was initialised while importing"
    if python_threads > 1:
        return f"{python_threads - 1} Python thread(s) were started while importing"
    return None


def learned_import_hazard(kind: str, module: str) -> str | None:
    """After importing one of a kind's learned modules: why forking is now unsafe, or None.
    An unsafe manifest is set aside so that the kind's next zygote does not import it."""
    hazard = fork_hazard(threading.active_count(), _cuda_initialized())
    if hazard is None:
        return None
    where = import_manifest.set_aside(kind, hazard)
    return (f"{hazard} by the learned module {module}; the list of modules learned from "
            f"earlier loads was set aside ({where}), so the next zygote of this kind starts "
            "without it")


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # a torch without CUDA support: nothing can be initialised
        return False


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


class Zygote:
    def __init__(self, kind: str, control: socket.socket, parent_pid: int) -> None:
        self.kind = kind
        self.control = control
        self.parent_pid = parent_pid
        self.pid = os.getpid()  # a forked child's parent, which it checks it still has
        self.unsafe: str | None = None  # set when learned imports made forking unsafe
        #: Learned modules still to import, one per pass of the loop when nothing else waits.
        self._to_learn: collections.deque[str] = collections.deque()
        self._learning = import_manifest.Learning()
        self._learn_again = False
        self.children: set[int] = set()
        # SIGCHLD wakes the select through this pipe (the handler itself does nothing).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(self, record: bytes, fds: tuple[int, ...] = ()) -> None:
        try:
            zygote_protocol.send(self.control, record, fds)
        except OSError as e:  # the supervisor is gone
            log.info("control socket closed (%s); exiting", e)
            self.exit(0)

    def serve(self) -> NoReturn:
        while True:
            # Learning waits for idle moments: forks and reaps never wait for an import.
            timeout = 0.0 if self._to_learn else None
            try:
                ready, _, _ = select.select([self.control.fileno(), self._wake_r], [], [],
                                            timeout)
            except InterruptedError:
                continue
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            self._reap()
            if self.control.fileno() in ready:
                self._handle_control()
            elif not ready and self._to_learn:
                self._learn_next()

    def _handle_control(self) -> None:
        try:
            record, fds = zygote_protocol.receive(self.control)
        except (ConnectionError, OSError, ZygoteProtocolError) as e:
            log.info("control socket failed (%s); exiting", e)
            self.exit(0)
        if not record:
            log.info("supervisor closed the control socket; exiting")
            self.exit(0)
        try:
            message = zygote_protocol.decode(record, fds)
        except ZygoteProtocolError as e:
            log.error("bad control message: %s; exiting", e)
            self.exit(3)
        if message["t"] == "learn":
            self._learn()
            return
        if message["t"] != "fork":
            log.error("unexpected control message %r; exiting", message["t"])
            self.exit(3)
        if self.unsafe is not None:
            for fd in fds:
                os.close(fd)
            self.send(zygote_protocol.encode("fork_failed", id=message["id"],
                                             error=f"forking is unsafe: {self.unsafe}"))
            return
        self._fork(message, fds)

    def _learn(self) -> None:
        """Queue what the kind's workers learned since the last time (see :meth:`serve`)."""
        if self.unsafe is not None:
            self._report_learning(self.unsafe)
            return
        if self._to_learn:  # a round is under way: it reads the manifest again at its end
            self._learn_again = True
            return
        self._to_learn.extend(import_manifest.pending(self.kind))
        self._learning = import_manifest.Learning()
        if not self._to_learn:
            self._report_learning(None)

    def _learn_next(self) -> None:
        hazard = self._learning.take(self.kind, self._to_learn.popleft(),
                                     lambda name: learned_import_hazard(self.kind, name))
        if hazard is not None:
            self.unsafe = hazard
            self._to_learn.clear()
            log.warning("zygote for kind %r will not fork any more: %s", self.kind, hazard)
        if not self._to_learn and hazard is None and self._learn_again:
            self._learn_again = False
            self._to_learn.extend(import_manifest.pending(self.kind))
        if not self._to_learn:
            self._report_learning(hazard)

    def _report_learning(self, hazard: str | None) -> None:
        """One ``learned`` answers every ``learn`` since the last one."""
        done = self._learning
        self.send(zygote_protocol.encode("learned", modules=done.modules, failed=done.failed,
                                         seconds=done.seconds, unsafe=hazard))

    def _fork(self, message: dict[str, Any], fds: list[int]) -> None:
        stdout_fd, stderr_fd = fds
        runtime.flush_logs()  # buffered lines would otherwise be written twice
        try:
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            self.send(zygote_protocol.encode("fork_failed", id=message["id"],
                                             error=e.strerror or str(e)))
            return
        if pid == 0:
            self._become_worker(message, stdout_fd, stderr_fd)
        os.close(stdout_fd)
        os.close(stderr_fd)
        self.children.add(pid)
        # Opened before this process could reap the child, so it names that child for sure.
        pidfd = os.pidfd_open(pid)
        try:
            self.send(zygote_protocol.encode("forked", id=message["id"], pid=pid), (pidfd,))
        finally:
            os.close(pidfd)

    def _become_worker(self, message: dict[str, Any], stdout_fd: int,
                       stderr_fd: int) -> NoReturn:
        """The child's side of a fork: shed the zygote, then run an ordinary worker."""
        code = runtime.EXIT_PROTOCOL
        try:
            os.setsid()  # its own session and process group, as a spawned worker has
            proctitle.worker(None, self.kind)  # not "zygote" any more; the load names the model
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.control.close()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            os.close(stdout_fd)
            os.close(stderr_fd)
            code = runtime.main(socket_path=message["socket"], kind=self.kind,
                                parent_pid=self.pid,
                                max_threads=message["max_threads"], forked=True)
        except BaseException:
            traceback.print_exc()
        runtime.flush_logs()
        os._exit(code)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(zygote_protocol.encode("exited", pid=pid,
                                             code=os.waitstatus_to_exitcode(status)))

    def exit(self, code: int) -> NoReturn:
        runtime.flush_logs()
        os._exit(code)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workers.zygote",
        description="Lemonade zygote: imports a worker kind once and forks workers from it.",
    )
    parser.add_argument("--kind", required=True)
    parser.add_argument("--control-fd", required=True, type=int)
    parser.add_argument("--parent-pid", required=True, type=int)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    proctitle.zygote(args.kind)
    runtime.setup_logging()
    runtime.set_parent_death_signal()
    if os.getppid() != args.parent_pid:
        log.error("parent %d is gone (ppid is %d); exiting", args.parent_pid, os.getppid())
        return runtime.EXIT_ORPHANED
    runtime.harden_process()
    control = socket.socket(fileno=args.control_fd)
    control.set_inheritable(False)
    started = time.perf_counter()
    try:
        registry.resolve(args.kind).prepare_zygote()
    except Exception as e:
        # The supervisor sees the process end before "ready" and spawns this kind plainly;
        # a spawned worker then reports the same import error where the user looks for it.
        log.error("zygote for kind %r cannot import its modules: %s: %s",
                  args.kind, type(e).__name__, e)
        return EXIT_IMPORT_FAILED
    hazard = fork_hazard(threading.active_count(), _cuda_initialized())
    learned = 0
    if hazard is None:
        done, hazard = import_manifest.import_learned(
            args.kind, lambda name: learned_import_hazard(args.kind, name))
        learned = done.modules
    import_s = time.perf_counter() - started
    zygote = Zygote(args.kind, control, args.parent_pid)
    zygote.send(zygote_protocol.encode(
        "ready", pid=os.getpid(), kind=args.kind, import_s=import_s,
        threads=_native_threads(), learned=learned, unsafe=hazard))
    if hazard is not None:
        log.warning("zygote for kind %r will not fork: %s", args.kind, hazard)
        # Stay until the supervisor closes the socket, so it can tell "unsafe" from "died".
        with contextlib.suppress(OSError, ZygoteProtocolError):
            while zygote_protocol.receive(control)[0]:
                pass
        return 0
    zygote.serve()


if __name__ == "__main__":
    sys.exit(main())
