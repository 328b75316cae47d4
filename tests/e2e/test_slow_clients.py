"""Slow and greedy clients, with raw sockets against a real server (fault matrix H4, H6).

A client that dribbles its header block or its body is cut off and frees what it held; at
``max_connections`` a newcomer takes the place of the oldest connection that has not sent its
headers, and gets a 503 at once only when every connection is past its headers; past
``max_waiting`` a request that would wait gets a 503 with Retry-After; other clients are
answered throughout.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from tests.e2e.conftest import wait_for

CONFIG = """
[server]
auto_unload_timer = "10m"
header_timeout = "1s"
body_timeout = "1s"
max_connections = 6
max_waiting = 2
[models.slow]
recipe = "synthetic"
type = "tts"
[models.slow.options]
load_seconds = 4
"""


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def _closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` while we dribble a byte every 0.3 s."""
    started = time.monotonic()
    sock.settimeout(0.3)
    for byte in dribble or b"x" * 1000:
        if time.monotonic() - started > seconds:
            return None
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - started
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - started
    return None


def _assert_408(sock: socket.socket) -> None:
    """Read the server's whole answer on ``sock``: a 408 that names body_timeout."""
    sock.settimeout(15)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "body_timeout (1s)" in json.loads(body)["error"]["message"]


def _health_ok(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return response.status == 200


def _health_ok_or_full(url: str) -> bool:
    """True when answered; False while the connection cap still turns it away."""
    try:
        return _health_ok(url)
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise
        e.close()
        return False
    except (ConnectionResetError, http.client.RemoteDisconnected):
        return False


def test_a_dribbled_header_block_is_cut_off_and_others_are_served(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    slow = _connect(server.url)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # Header lines keep coming, a byte every 0.3 s, never the blank line that ends them.
    result: dict[str, float | None] = {}
    cutter = threading.Thread(target=lambda: result.update(
        closed=_closed_within(slow, 20, b"X-Slow: " + b"a" * 200)))
    cutter.start()
    assert _health_ok(server.url)  # another client is answered meanwhile
    cutter.join(30)
    slow.close()
    assert result["closed"] is not None and result["closed"] < 15, result


def test_a_kept_alive_connections_next_header_block_has_the_same_deadline(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    sock = _connect(server.url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(1.5)  # idle between requests is fine: longer than header_timeout, no close
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the next one dribbles
    closed = _closed_within(sock, 20, b"X-Slow: " + b"a" * 200)
    sock.close()
    assert closed is not None and closed < 15, closed


def test_a_dribbled_body_is_a_408(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    sock = _connect(server.url)
    sock.sendall(b"POST /api/v1/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model")
    _assert_408(sock)
    assert server.model("slow")["state"] == "unloaded"  # nothing was done with half a body


def test_at_max_connections_a_newcomer_takes_a_stalled_connections_place(start_server) -> None:  # type: ignore[no-untyped-def]
    config = CONFIG.replace('header_timeout = "1s"', 'header_timeout = "30s"')
    server = start_server(config)
    stalled = [_connect(server.url) for _ in range(6)]  # never send a header block
    try:
        # The cap is full of stalled connections: a normal client still gets in, and the
        # oldest stalled connection is the one closed to make room.
        assert _health_ok(server.url)
        stalled[0].settimeout(10)
        assert stalled[0].recv(4096) == b""
    finally:
        for sock in stalled:
            sock.close()


def test_at_max_connections_of_busy_clients_a_newcomer_gets_a_503(start_server) -> None:  # type: ignore[no-untyped-def]
    config = CONFIG.replace('header_timeout = "1s"', 'header_timeout = "30s"')
    server = start_server(config)
    # Six kept-alive connections that have each sent a whole request: none is stalled.
    busy = [_connect(server.url) for _ in range(6)]
    try:
        for sock in busy:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        extra = _connect(server.url)
        extra.settimeout(10)
        answer = extra.recv(4096)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:120]
        assert b"Retry-After: 1" in answer and b"too_many_connections" in answer
        busy.pop().close()
        # One slot is free again: a normal client gets through once the server has seen the
        # close (on a busy machine that can take a moment; until then it is still a 503).
        wait_for(lambda: _health_ok_or_full(server.url), 20)
    finally:
        for sock in busy:
            sock.close()


def test_a_stalled_upload_is_a_408(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    sock = _connect(server.url)
    sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: multipart/form-data; boundary=XyZ\r\n"
                 b"Content-Length: 100000\r\n\r\n"
                 b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
                 b"\r\n\r\nRIFF")  # then nothing more
    _assert_408(sock)


def test_past_max_waiting_a_request_that_would_wait_is_a_503(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(CONFIG)
    results: list[int] = []

    def speak() -> None:
        body = json.dumps({"model": "slow", "input": "hi"}).encode()
        request = urllib.request.Request(server.url + "/v1/audio/speech", data=body,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                results.append(response.status)
        except urllib.error.HTTPError as e:
            results.append(e.code)

    waiting = [threading.Thread(target=speak) for _ in range(2)]
    for thread in waiting:
        thread.start()
    wait_for(lambda: server.model("slow")["waiting"] == 2, 10)
    refused = server.speech("slow")
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert "max_waiting 2" in refused.error["message"]
    assert refused.error["code"] == "server_queue_full"
    for thread in waiting:
        thread.join(60)
    assert results == [200, 200]  # the two that waited are served
    assert server.speech("slow").status == 200  # a loaded model does not wait
