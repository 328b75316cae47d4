"""Slow and greedy clients: does everybody else still get answers, and what do the limits do?

One ``lemonade serve`` (a synthetic model, loopback only), measured side by side in one run:

- **quiet**: a normal client sends ``GET /health`` back to back for ``--seconds``;
- **slowloris**: the same, while ``--attackers`` connections each send a request's header
  lines one byte every ``--drip`` seconds and never finish them (the server's
  ``header_timeout`` should close each; an attacker reconnects when it is closed, so the
  pressure stays up);
- **flood**: the same, while the attackers open idle connections as fast as they can until
  the server refuses them (``max_connections``).

Printed per arm: the normal client's requests, median and p99 latency, errors; how many
attacker connections the server closed or refused. Everything is bounded in count and time.

Run: ``.venv/bin/python bench/slow_clients.py [--seconds 10] [--attackers 200]
[--header-timeout 2] [--max-connections 256]``
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import socket
import threading
import time
from pathlib import Path

from harness import ServerProcess, print_table, summary, work_folder


def config(header_timeout: float, max_connections: int) -> str:
    return (f'[server]\nheader_timeout = "{header_timeout}s"\nmax_connections = '
            f'{max_connections}\n[models.tone]\nrecipe = "synthetic"\ntype = "tts"\n')


def normal_client(port: int, seconds: float) -> tuple[list[float], int]:
    latencies, errors = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        if ok:
            latencies.append(time.perf_counter() - started)
        else:
            errors += 1
            time.sleep(0.01)
    return latencies, errors


class Attack:
    def __init__(self, port: int, count: int, mode: str, drip_s: float, seconds: float) -> None:
        self.port, self.count, self.mode, self.drip_s = port, count, mode, drip_s
        self.end = time.monotonic() + seconds
        self.closed = 0  # connections the server closed on us
        self.refused = 0  # connections answered 503 at once
        self.opened = 0
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def _one(self) -> None:
        while time.monotonic() < self.end:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                time.sleep(0.05)
                continue
            self._count("opened")
            try:
                if self.mode == "slowloris":
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                sock.settimeout(self.drip_s)
                while time.monotonic() < self.end:
                    try:
                        data = sock.recv(4096)
                    except TimeoutError:
                        if self.mode == "slowloris":
                            sock.sendall(b"a")
                        continue
                    if data.startswith(b"HTTP/1.1 503"):
                        self._count("refused")
                    else:
                        self._count("closed")
                    break
            except OSError:
                self._count("closed")
            finally:
                with contextlib.suppress(OSError):
                    sock.close()

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._one, daemon=True) for _ in range(self.count)]
        for thread in threads:
            thread.start()
        return threads


def arm(port: int, mode: str, args: argparse.Namespace) -> list[object]:
    attack = Attack(port, args.attackers, mode, args.drip, args.seconds) if mode != "quiet" \
        else None
    threads = attack.run() if attack else []
    time.sleep(0.5 if attack else 0)  # let the attack build up first
    latencies, errors = normal_client(port, args.seconds)
    for thread in threads:
        thread.join(args.seconds + 10)
    median, tail = summary(latencies) if latencies else (float("nan"), float("nan"))
    return [mode, len(latencies), median * 1000, tail * 1000, errors,
            attack.opened if attack else 0, attack.closed if attack else 0,
            attack.refused if attack else 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--attackers", type=int, default=200)
    parser.add_argument("--drip", type=float, default=0.5)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with work_folder(args.workdir, "slow-clients-") as workdir:
        server = ServerProcess(config(args.header_timeout, args.max_connections), Path(workdir))
        try:
            rows = [arm(server.port, mode, args) for mode in ("quiet", "slowloris", "flood")]
        finally:
            server.stop()
    print_table(
        f"GET /health from one normal client, {args.seconds:g} s per arm; {args.attackers} "
        f"attackers; header_timeout {args.header_timeout:g} s, max_connections "
        f"{args.max_connections}",
        ["arm", "requests", "median ms", "p99 ms", "errors", "attacker conns",
         "closed by server", "refused 503"], rows)


if __name__ == "__main__":
    main()
