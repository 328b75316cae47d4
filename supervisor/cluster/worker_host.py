"""The Ray actor that starts one model's worker process on the node Ray placed it on.

Ray places the actor (on the node the router chose, with the resources the recipe asks
for); the actor starts ``python -m workers --socket tcp:ROUTER:PORT`` as its child, and from
the hello on, the router talks to that process exactly as to a local one. The model lives in
the child, so ending it gives every byte back; the actor stays small and only reports:
the child's pid, its exit status (:meth:`wait`, which the router keeps one call of pending as
its exit watcher), its last output lines, and passes on a signal.

``ray.kill`` on the actor ends the child too: the worker arms ``PR_SET_PDEATHSIG`` against
its parent, and its parent is the actor's own thread that started it and waits for it
(:meth:`_run`), which lives as long as the actor. The worker's output goes to the actor's
stdout, which Ray keeps in the node's log and forwards to the router's log.

This module is imported on every node (the project must be installed there, in the
environment ``ray start`` runs from); it does not import Ray, which wraps the class.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from supervisor.process import worker_environment
from workers.runtime import TOKEN_ENV

_TAIL_LINES = 40


class WorkerHost:
    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._exited = threading.Event()
        self._error: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def start(self, connect: str, kind: str, max_threads: int, data_dir: str | None,
              token: str) -> dict[str, Any]:
        """Start the worker; returns its pid and where it runs."""
        env = worker_environment(data_dir=data_dir)
        env[TOKEN_ENV] = token
        argv = [sys.executable, "-m", "workers", "--socket", connect, "--kind", kind,
                "--parent-pid", str(os.getpid()), "--max-threads", str(max_threads)]
        threading.Thread(target=self._run, args=(argv, env), name="worker-runner",
                         daemon=True).start()
        self._started.wait()
        if self._proc is None:
            raise RuntimeError(f"could not start the worker: {self._error}")
        return {"pid": self._proc.pid, "host_pid": os.getpid(),
                "hostname": os.uname().nodename}

    def _run(self, argv: list[str], env: dict[str, str]) -> None:
        # This thread is the worker's parent for PR_SET_PDEATHSIG: it must outlive the child,
        # so it starts it, then pumps its output until it exits.
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        except OSError as e:
            self._error = f"{type(e).__name__}: {e}"
            self._exited.set()
            return
        finally:
            self._started.set()
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self._tail.append(line)
            print(line, flush=True)
        self._proc.wait()
        self._exited.set()

    def wait(self) -> int:
        """The worker's exit status, once it has exited (negative: killed by that signal)."""
        self._exited.wait()
        return -1 if self._proc is None else int(self._proc.returncode)

    def signal(self, signum: int) -> None:
        """Signal the worker's process group (it leads its own session)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.Signals(signum))

    def tail(self) -> list[str]:
        return list(self._tail)
