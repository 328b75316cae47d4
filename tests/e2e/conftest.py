"""End-to-end fixtures: a real ``lemonade serve`` subprocess, talked to over real HTTP.

``start_server(config_toml, env=..., args=...)`` writes the config into ``tmp_path``, starts
``python -m supervisor.cli serve --config PATH --port 0`` with a controlled environment
(no inherited ``LEMONADE_*``), learns the port from the ``listening on http://HOST:PORT`` log
line and keeps draining the server's output into ``log_lines`` from a thread, so tests can
assert on the log and the pipe never fills up.

Teardown is SIGTERM, up to 15 s, then SIGKILL; then the pipe is closed and the thread joined.
Worker processes are the server's children, not ours, so the autouse leak guard cannot see
one that outlives its server: every worker pid seen is remembered, and one still alive after
its server is gone is killed and fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import psutil
import pytest

STARTUP_TIMEOUT_S = 60.0  # normally ~1 s; generous for a loaded CI machine
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0
LISTENING_RE = re.compile(r"listening on (http://\S+):(\d+)")
LEMONADE_SCRIPT = Path(sys.executable).parent / "lemonade"
MIB = 1024 * 1024

# urllib must never send 127.0.0.1 traffic to a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without LEMONADE_* and proxies, with info logging, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("LEMONADE_") and "proxy" not in k.lower()
    }
    env["LEMONADE_LOG_LEVEL"] = "info"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_for(predicate: Callable[[], Any], seconds: float, interval: float = 0.05,
                         what: str = "condition") -> Any:
    """``wait_for`` for async tests: the (blocking) predicate runs in a thread."""
    deadline = time.monotonic() + seconds
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True when the process has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_alive(pid: int) -> bool:
    return not pid_gone(pid)


@dataclass
class HttpResult:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI-style error object; asserts the shape."""
        data = self.json()
        assert isinstance(data, dict) and set(data) == {"error"}, data
        err = data["error"]
        assert isinstance(err.get("message"), str) and err["message"], err
        assert isinstance(err.get("type"), str) and err["type"], err
        assert isinstance(err.get("code"), str) and err["code"], err
        return err


def http(method: str, url: str, *, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT_S) -> HttpResult:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return HttpResult(response.status, response.headers, response.read())
    except urllib.error.HTTPError as e:
        with contextlib.closing(e):
            return HttpResult(e.code, e.headers, e.read())


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    config_path: Path
    log_lines: list[str]
    _thread: threading.Thread
    _seen_workers: dict[int, float] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # --------------------------------------------------------------- HTTP helpers

    def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None,
                timeout: float = HTTP_TIMEOUT_S) -> HttpResult:
        all_headers = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
        return http(method, self.url + path, body=data, headers=all_headers, timeout=timeout)

    def get(self, path: str, **kwargs: Any) -> HttpResult:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> HttpResult:
        if json is None and "data" not in kwargs:
            kwargs["data"] = b""
        return self.request("POST", path, json_body=json, **kwargs)

    def status(self) -> dict[str, Any]:
        result = self.get("/api/v1/status")
        assert result.status == 200, result.body
        data: dict[str, Any] = result.json()
        for row in data["models"]:
            if row["pid"]:
                self._remember(row["pid"])
        return data

    def model(self, name: str) -> dict[str, Any]:
        for row in self.status()["models"]:
            if row["name"] == name:
                return row
        raise AssertionError(f"model {name!r} is not in the status")

    def wait_state(self, name: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            row = self.model(name)
            return row if row["state"] == state else None

        return wait_for(check, timeout, what=f"{name} to be {state}")  # type: ignore[no-any-return]

    def load(self, name: str, **fields: Any) -> dict[str, Any]:
        result = self.post("/api/v1/load", {"model_name": name, **fields})
        assert result.status == 200, result.body
        data: dict[str, Any] = result.json()
        self._remember(data["pid"])
        return data

    def speech(self, model: str, text: str = "Hello there", **fields: Any) -> HttpResult:
        return self.post("/v1/audio/speech", {"model": model, "input": text, **fields})

    # --------------------------------------------------------------- processes

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes the server has running now (not its zygotes)."""
        zygotes = set(self.zygote_pids())
        pids = []
        for child in self._descendants():
            if child.pid not in zygotes:
                pids.append(child.pid)
        return pids

    def zygote_pids(self) -> list[int]:
        """Pids of the server's zygotes: its own children running ``workers.zygote``.

        A zygote retitles itself ``lemonade zygote KIND`` as it starts (workers/proctitle.py);
        workers forked from it are its children, not the server's.
        """
        pids = []
        for child in self._descendants():
            with contextlib.suppress(psutil.Error):
                cmdline = child.cmdline()
                title = " ".join(part for part in cmdline if part)
                if child.ppid() == self.pid and ("workers.zygote" in cmdline
                                                 or title.startswith("lemonade zygote ")):
                    pids.append(child.pid)
        return pids

    def _descendants(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
                    self._remember(child.pid)  # zygotes too: none may outlive the server
        return alive

    def _remember(self, pid: int) -> None:
        if pid in self._seen_workers:
            return
        with contextlib.suppress(psutil.Error):
            self._seen_workers[pid] = psutil.Process(pid).create_time()

    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> list[str]:
        """SIGTERM, wait, SIGKILL; returns what went wrong (surviving workers, bugs logged)."""
        self.worker_pids()  # remember whatever runs right now
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        problems = self.kill_surviving_workers()
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        # A 500 or an unhandled exception is a bug whatever the test asserted.
        for line in self.log_lines:
            if "this is a bug" in line or "Traceback" in line or "never retrieved" in line:
                problems.append("the server log shows a bug:\n" + self.log_text())
                break
        return problems

    def kill_surviving_workers(self) -> list[str]:
        survivors = []
        for pid, created in self._seen_workers.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(proc.cmdline())[:100]
                proc.kill()
                survivors.append(f"worker {pid} ({cmd}) outlived its server")
            except psutil.Error:
                continue
        return survivors


def _drain(stream: Iterable[bytes], lines: list[str], ready: threading.Event) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        lines.append(line)
        if LISTENING_RE.search(line):
            ready.set()
    ready.set()  # EOF: the server exited (the waiter checks which)


def dedent_config(config: str) -> str:
    return textwrap.dedent(config).strip() + "\n"


def launch_server(config: str, directory: Path, *, env: dict[str, str] | None = None,
                  args: Iterable[str] = (), popen: Callable[..., Any] = subprocess.Popen,
                  server_cls: type[Server] = Server) -> Server:
    """Start a server; the caller must ``stop()`` it (and fail on what ``stop()`` returns).

    ``popen`` starts the process (the cluster tests start it inside a network namespace)
    and ``server_cls`` is what talks to it."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"lemonade-{time.monotonic_ns()}.toml"
    config_path.write_text(dedent_config(config))
    cmd = [sys.executable, "-m", "supervisor.cli", "serve", "--config", str(config_path),
           "--port", "0", *args]
    proc = popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=server_env(env), cwd=directory,
    )
    lines: list[str] = []
    ready = threading.Event()
    assert proc.stdout is not None
    thread = threading.Thread(target=_drain, args=(proc.stdout, lines, ready), daemon=True)
    thread.start()
    ready.wait(STARTUP_TIMEOUT_S)
    match = next((m for m in map(LISTENING_RE.search, lines) if m), None)
    server = server_cls(proc, "", config_path, lines, thread)
    if match is None:
        problems = server.stop()
        pytest.fail("the server did not log 'listening on http://HOST:PORT' within "
                    f"{STARTUP_TIMEOUT_S}s (exit code {proc.returncode}); output:\n"
                    + "\n".join(lines) + "".join(f"\n{p}" for p in problems))
    server.url = f"{match.group(1)}:{match.group(2)}"
    return server


def module_server(factory: pytest.TempPathFactory, config: str, name: str, *,
                  load: Iterable[str] = (), load_timeout_s: float = 600.0,
                  shared_data: bool = False) -> Iterator[Server]:
    """The body of a module-scoped ``server`` fixture (``yield from module_server(...)``):
    one server for the module with ``load`` loaded before any test (and before the per-test
    leak guard looks), stopped at the end with no worker left, no crash and no logged bug.
    ``shared_data``: the session's one data dir, so converted weights are built once."""
    from tests.helpers import shared_data_dir

    env = {"LEMONADE_DATA_DIR": str(shared_data_dir(factory))} if shared_data else None
    server = launch_server(config, Path(factory.mktemp(name)), env=env)
    try:
        for model in load:
            loaded = server.post("/api/v1/load", {"model_name": model}, timeout=load_timeout_s)
            assert loaded.status == 200, loaded.body
        yield server
        assert server.alive(), server.log_text()
        assert not any("this is a bug" in line for line in server.log_lines), server.log_text()
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """A factory: ``start_server(config_toml, env={...}, args=[...]) -> Server``."""
    servers: list[Server] = []

    def start(config: str, *, env: dict[str, str] | None = None,
              args: Iterable[str] = ()) -> Server:
        server = launch_server(config, tmp_path, env=env, args=args)
        servers.append(server)
        return server

    yield start

    problems = []
    for server in servers:
        problems += server.stop()
    if problems:
        pytest.fail("; ".join(problems))


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lemonade`` script."""
    return subprocess.run(
        [str(LEMONADE_SCRIPT), *args], capture_output=True, text=True,
        env=server_env(env), timeout=timeout, stdin=subprocess.DEVNULL,
    )
