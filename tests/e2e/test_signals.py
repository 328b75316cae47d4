"""Signals to the server: an orderly stop ends every worker; a killed server leaves none.

Workers are the server's children, not the test's, so the autouse leak guard cannot see a
worker that outlives its server. These tests check for that directly, and the fixture kills
(and reports) any worker that survives its server.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

from supervisor.rundir import RUNTIME_DIR_PREFIX
from tests.e2e.conftest import Server, pid_alive, pid_gone, wait_for

TWO_MODELS = """
[models.tone]
recipe = "synthetic"
type = "tts"
[models.tone-2]
recipe = "synthetic"
type = "tts"
"""


def _runtime_dir(server: Server) -> Path:
    """The server's private socket dir: the one whose owner file names the server's pid.

    (Forked workers carry their zygote's command line, so the worker's ``--socket`` argument
    cannot be read from every worker.)
    """
    env = psutil.Process(server.pid).environ()
    root = Path(env.get("XDG_RUNTIME_DIR") or env.get("TMPDIR") or tempfile.gettempdir())
    for path in root.glob(RUNTIME_DIR_PREFIX + "*"):
        with contextlib.suppress(OSError, IndexError):
            if (path / "owner").read_text().split()[0] == str(server.pid):
                return path
    raise AssertionError(f"no runtime dir of server {server.pid} under {root}")


def _stop_with(server: Server, sig: signal.Signals) -> tuple[int, float]:
    started = time.monotonic()
    server.proc.send_signal(sig)
    try:
        code = server.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit within 15 s of {sig.name}:\n"
                             + server.log_text()) from None
    return code, time.monotonic() - started


def test_sigterm_stops_the_server_and_every_worker(start_server):
    server = start_server(TWO_MODELS)
    pids = [server.load("tone")["pid"], server.load("tone-2")["pid"]]
    assert sorted(server.worker_pids()) == sorted(pids)
    runtime_dir = _runtime_dir(server)
    assert runtime_dir.is_dir()

    code, took = _stop_with(server, signal.SIGTERM)
    assert code == 0, server.log_text()
    assert took < 15
    for pid in pids:
        assert pid_gone(pid), f"worker {pid} outlived the server"
    assert not runtime_dir.exists()
    log = server.log_text()
    assert "shutting down" in log
    assert "unloaded (shutdown)" in log


def test_sigint_is_an_orderly_stop_too(start_server):
    server = start_server(TWO_MODELS)
    pid = server.load("tone")["pid"]
    code, _ = _stop_with(server, signal.SIGINT)
    assert code == 0, server.log_text()
    assert pid_gone(pid)


def test_sigterm_while_a_request_is_in_flight(start_server):
    server = start_server("""
        [models.slow]
        recipe = "synthetic"
        type = "tts"
        [models.slow.options]
        latency_ms = 1500
    """)
    pid = server.load("slow")["pid"]
    results = []
    thread = threading.Thread(target=lambda: results.append(server.speech("slow")))
    thread.start()
    wait_for(lambda: server.model("slow")["in_flight"] == 1, 5, what="the request in flight")
    code, took = _stop_with(server, signal.SIGTERM)
    thread.join(15)
    assert code == 0, server.log_text()
    assert pid_gone(pid)
    # The request in flight was allowed to finish (the stop is orderly, not a cut-off).
    assert results and results[0].status == 200, results
    assert took < 12


def test_sigkill_to_the_server_ends_its_worker(start_server, tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    server = start_server(TWO_MODELS, env=env)
    pid = server.load("tone")["pid"]
    assert pid_alive(pid)
    zygotes = server.zygote_pids()  # the default starts workers by forking from a zygote
    assert psutil.Process(pid).ppid() in zygotes
    runtime_dir = _runtime_dir(server)
    assert runtime_dir.parent == tmp_path

    server.proc.kill()
    server.proc.wait(5)
    killed = time.monotonic()
    # Parent-death signals (server -> zygote -> worker) and socket EOF: nothing may linger.
    for orphan in [pid, *zygotes]:
        wait_for(lambda orphan=orphan: pid_gone(orphan), 1.0, interval=0.02,
                 what=f"process {orphan} to exit after its server was SIGKILLed")
    assert time.monotonic() - killed < 1.0

    # The dead server's runtime dir is left behind; the next server sweeps it away.
    assert runtime_dir.exists()
    second = start_server(TWO_MODELS, env=env)
    assert not runtime_dir.exists()
    assert any("stale runtime dir" in line for line in second.log_lines)
    assert second.speech("tone").status == 200


def test_sigterm_with_an_event_stream_open_exits_promptly(start_server):
    """A dashboard watching /api/v1/events must not hold up Ctrl-C / systemctl stop."""
    server = start_server(TWO_MODELS)
    pid = server.load("tone")["pid"]
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sse:
        sse.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = sse.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        code, took = _stop_with(server, signal.SIGTERM)
        assert code == 0, server.log_text()
        assert took < 5, f"the server took {took:.1f}s to stop with an event stream open"
        # The stream was ended, not left hanging.
        rest = b""
        while chunk := sse.recv(4096):
            rest += chunk
    assert pid_gone(pid)
