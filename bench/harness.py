"""What every benchmark here shares: a real ``lemonade serve`` on a free port, and tables.

Benchmarks measure side by side in one run and print medians and p99; this module keeps the
server start-up (parse the "listening on" line, drain the log so the server never blocks on a
full pipe) and the table printing in one place so each script is only its measurement.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class ServerProcess:
    """``lemonade serve --config <workdir>/lemonade.toml --port 0`` as a child process."""

    def __init__(self, config: str, workdir: Path, extra_args: Sequence[str] = (),
                 start_timeout_s: float = 60.0) -> None:
        path = workdir / "lemonade.toml"
        path.write_text(config)
        self._start([sys.executable, "-m", "supervisor.cli", "serve", "--config", str(path),
                     "--port", "0", "--log-level", "info", *extra_args],
                    workdir, None, start_timeout_s)

    def _start(self, argv: Sequence[str], workdir: Path, env: dict[str, str] | None,
               start_timeout_s: float) -> None:
        """Run ``argv``; ready once it logs "listening on http://HOST:PORT"."""
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=workdir, env=env)
        self.pid = self.proc.pid
        self.port = 0
        self.log: list[str] = []
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(start_timeout_s) or not self.port:
            self.proc.kill()
            self.proc.wait()
            tail = "\n".join(self.log[-20:])
            raise SystemExit(f"{argv[1:3]} did not start:\n{tail}")

    def _drain(self, ready: threading.Event) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            del self.log[:-500]  # keep the tail only: a long benchmark logs a lot
            match = re.search(r"listening on http://\S+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                ready.set()
        ready.set()

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 600) -> Any:
        """One JSON request; exits the benchmark with the server's answer unless it is 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise SystemExit(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data) if data else None

    def model_row(self, name: str) -> dict[str, Any]:
        status = self.request("GET", "/api/v1/status")
        return next(r for r in status["models"] if r["name"] == name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_speech(port: int, body: dict[str, Any],
                  path: str = "/v1/audio/speech") -> dict[str, Any]:
    """Send one streamed speech request; return first-byte and last-byte seconds, the audio
    byte count and the response headers. Exits the benchmark unless the answer is 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        started = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"speech: {response.status} {response.read()[:300]!r}")
        first = response.read1(65536)
        first_byte_s = time.perf_counter() - started
        nbytes = len(first)
        while chunk := response.read1(65536):
            nbytes += len(chunk)
        return {"first_byte_s": first_byte_s, "total_s": time.perf_counter() - started,
                "bytes": nbytes, "headers": dict(response.getheaders())}
    finally:
        conn.close()


@contextlib.contextmanager
def work_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """``--workdir`` (kept, so files such as weights are written once) or a temporary one."""
    if path:
        folder = Path(path).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def p99(values: Sequence[float]) -> float:
    """Nearest-rank 99th percentile (the largest value when there are fewer than 100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                    for i, h in enumerate(header)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i])
                        for i, v in enumerate(row)))


def summary(values: Sequence[float]) -> tuple[float, float]:
    """(median, p99) of a list of measurements."""
    return statistics.median(values), p99(values)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)
