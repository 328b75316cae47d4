"""Soak: mixed requests and injected faults against a real ``lemonade serve`` for N minutes.

Starts the server on a generated config (six synthetic models, ``max_loaded_models = 2`` so
evictions never stop; four of them inject a fault on every call: SIGKILL mid-stream, garbage
frames, a hang, a real MemoryError), then runs several client threads that pick at random:
a plain request, a streamed one, a stream the client abandons after the first chunk, a load,
an unload, a status read. At the end it prints the router's RSS at start, after the warm-up
and at the end, the growth after the warm-up (the L2 figure), the status counts, and whether
any 500 was seen or any worker outlived the server.

    .venv/bin/python bench/soak.py --minutes 10
    .venv/bin/python bench/soak.py --minutes 1 --warmup 10   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

CONFIG = """
[server]
max_loaded_models = 2
auto_unload_timer = "3s"
stop_grace = "1s"
drain_timeout = "3s"
load_timeout = "10s"
call_timeout = "2s"
load_failure_cooldown = "0.5s"
heartbeat_interval = "1s"
heartbeat_timeout = "1s"
log_level = "info"
"""
MODELS = {
    "clean-a": {"latency_ms": 40, "chunks": 4},
    "clean-b": {"latency_ms": 120, "chunks": 8, "memory_mb": 20},
    "crashy": {"fault": "sigkill_mid_call", "fault_after_chunks": 1, "chunks": 4},
    "garbage": {"fault": "garbage_mid_call", "fault_after_chunks": 1},
    "hangy": {"fault": "hang_mid_call", "fault_after_chunks": 1},
    "oomy": {"fault": "oom_mid_call", "fault_after_chunks": 0},
}
WEIGHTS = {"clean-a": 6, "clean-b": 4, "crashy": 1, "garbage": 1, "hangy": 1, "oomy": 1}


def write_config(directory: Path) -> Path:
    text = CONFIG
    for name, options in MODELS.items():
        text += f'\n[models.{name}]\nrecipe = "synthetic"\ntype = "tts"\n[models.{name}.options]\n'
        for key, value in options.items():
            text += f"{key} = {json.dumps(value)}\n"
    path = directory / "soak.toml"
    path.write_text(text)
    return path


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1


def one_request(port: int, rng: random.Random, stats: Stats) -> None:
    action = rng.choices(["plain", "stream", "abandon", "load", "unload", "status"],
                         weights=[40, 25, 15, 5, 5, 10])[0]
    model = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if action == "status":
            conn.request("GET", "/api/v1/status")
        elif action == "load":
            conn.request("POST", "/api/v1/load", json.dumps({"model_name": model}))
        elif action == "unload":
            conn.request("POST", "/api/v1/unload", json.dumps({"model_name": model}))
        else:
            body = {"model": model, "input": "soak " * rng.randint(1, 30),
                    "response_format": "pcm", "stream": action != "plain"}
            conn.request("POST", "/v1/audio/speech", json.dumps(body),
                         {"Content-Type": "application/json"})
        response = conn.getresponse()
        if action == "abandon" and response.status == 200:
            response.read(100)
            stats.add("abandoned")
            return
        try:
            response.read()
        except (http.client.IncompleteRead, ConnectionError):
            stats.add("truncated")  # a stream that broke after it started: expected for faults
        stats.add(str(response.status))
    except (ConnectionError, TimeoutError, OSError) as e:
        stats.add(f"conn:{type(e).__name__}")
    finally:
        conn.close()


def client(port: int, seed: int, stop: threading.Event, stats: Stats) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        one_request(port, rng, stats)
        time.sleep(rng.random() * 0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="lemonade-soak-"))
    config = write_config(workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEMONADE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=workdir,
    )
    assert proc.stdout is not None
    port = None
    lines: list[str] = []
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        m = re.search(r"listening on http://\S+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        print("\n".join(lines))
        return 1
    bugs: list[str] = []
    log_path = workdir / "server.log"

    def drain() -> None:
        with log_path.open("w") as log:
            log.write("\n".join(lines) + "\n")
            for raw in proc.stdout:  # type: ignore[union-attr]
                line = raw.decode(errors="replace")
                log.write(line)
                if "this is a bug" in line or "Traceback" in line:
                    bugs.append(line.rstrip())

    threading.Thread(target=drain, daemon=True).start()
    router = psutil.Process(proc.pid)
    rss_start = router.memory_info().rss
    stats = Stats()
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(port, i, stop, stats), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    started = time.monotonic()
    end = started + args.minutes * 60
    rss_warm = None
    samples = []
    while time.monotonic() < end:
        time.sleep(5)
        rss = router.memory_info().rss
        samples.append(rss)
        if rss_warm is None and time.monotonic() - started >= args.warmup:
            rss_warm = rss
    stop.set()
    for t in threads:
        t.join(35)
    rss_end = router.memory_info().rss
    workers = [c.pid for c in router.children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    survivors = [pid for pid in workers if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    mib = 1024 * 1024
    rss_warm = rss_warm or rss_start
    print(f"soak: {args.minutes:g} min, {args.clients} clients, warm-up {args.warmup:g} s")
    print(f"router RSS: start {rss_start / mib:.1f} MiB, after warm-up {rss_warm / mib:.1f} MiB, "
          f"end {rss_end / mib:.1f} MiB, max {max(samples) / mib:.1f} MiB")
    print(f"router RSS growth after warm-up: {(rss_end - rss_warm) / mib:+.1f} MiB "
          f"(from start: {(rss_end - rss_start) / mib:+.1f} MiB)")
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.counts.items())))
    print(f"HTTP 500s: {stats.counts.get('500', 0)}; server exit code {code}; "
          f"workers left behind: {len(survivors)}; bugs in the log: {len(bugs)}")
    for line in bugs[:5]:
        print("  " + line)
    print(f"server log: {log_path}")
    ok = stats.counts.get("500", 0) == 0 and not survivors and not bugs and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
