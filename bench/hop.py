"""What the supervisor hop costs: one small call through the real server, next to the same
work done without it, behind an HTTP reverse proxy, and over a bare Unix socket.

Lemonade answers every request in a worker process, reached over msgpack frames on a Unix
socket. This script measures, side by side in one run, what that hop adds to a small call
(a short synthetic speech request, a few KB of WAV, latency_ms 0, not streamed), four ways:

  supervisor hop   HTTP -> ``lemonade serve`` (one synthetic model, loaded) -> socket -> worker
  in-process       HTTP -> an aiohttp handler that calls ``SyntheticModel`` itself
  HTTP proxy hop   HTTP -> aiohttp reverse proxy -> keep-alive HTTP -> the in-process app
                   (the llama-swap architecture)
  raw msgpack      one msgpack frame each way on a Unix socket to a process calling the model
                   (the floor: no HTTP, no supervisor)

It checks that every path returns the same audio bytes, then prints latency (median, p99,
median added over in-process; samples are taken in interleaved batches so a noisy neighbour
hits every path alike) and requests per second at concurrency 1, 8 and 64 for the HTTP paths,
with the target: the supervisor hop adds <= 150 us at the median over in-process and is
faster than the HTTP proxy hop.

Run: ``.venv/bin/python bench/hop.py [--requests 2000] [--seconds 5] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import math
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgpack
from harness import ServerProcess, print_table, summary
from hop_servers import (
    OPTIONS,
    SPEECH_PATH,
    Helper,
    pack_frame,
    serve_in_process,
    serve_proxy,
    serve_raw,
    speech_args,
)

from supervisor.config import Recipe
from workers import event_loop

MODEL = "tone"
#: Six characters: 0.36 s of tone, 5.8 KB of 8 kHz WAV.
TEXT = "Hello."
BODY = {"model": MODEL, "input": TEXT, "response_format": "wav"}
HEADERS = {"Content-Type": "application/json"}
CONCURRENCY = (1, 8, 64)
TARGET_ADDED_US = 150.0
#: Requests per path before it moves over to the next one while sampling latency.
BATCH = 25

SUPERVISOR, IN_PROCESS, PROXY, RAW = "supervisor hop", "in-process", "HTTP proxy hop", "raw msgpack"
#: The same two servers with the model called in a thread pool, as a server must that stays
#: responsive while a model runs (the worker behind the supervisor hop does this too).
IN_PROCESS_T, PROXY_T = "in-process, thread", "HTTP proxy hop, thread"


def config() -> str:
    options = "\n".join(f"{key} = {json.dumps(value)}" for key, value in OPTIONS.items())
    return f"""
[server]
auto_unload_timer = "never"
[models.{MODEL}]
recipe = "synthetic"
type = "tts"
[models.{MODEL}.options]
{options}
"""


# --------------------------------------------------------------------------- clients


class HttpPath:
    """A blocking keep-alive HTTP client: the cheapest client, so server costs dominate."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._body = json.dumps(BODY).encode()

    def call(self) -> bytes:
        self._conn.request("POST", SPEECH_PATH, body=self._body, headers=HEADERS)
        response = self._conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"port {self.port}: {response.status} {data[:300]!r}")
        return data

    def close(self) -> None:
        self._conn.close()


class RawPath:
    """The msgpack client: sends the call arguments the supervisor would send its worker."""

    def __init__(self, socket_path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(socket_path)
        self._frame = pack_frame(speech_args(BODY))

    def call(self) -> bytes:
        self._sock.sendall(self._frame)
        size = int.from_bytes(self._read(4), "big")
        audio: bytes = msgpack.unpackb(self._read(size))["audio"]
        return audio

    def _read(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise SystemExit("the raw msgpack server closed the connection")
            got += n
        return bytes(buf)

    def close(self) -> None:
        self._sock.close()


# --------------------------------------------------------------------------- measurements


def check_same_audio(paths: dict[str, HttpPath | RawPath]) -> int:
    """Every path must return the very same bytes, or the comparison means nothing."""
    answers = {name: path.call() for name, path in paths.items()}
    reference = answers[IN_PROCESS]
    for name, audio in answers.items():
        if audio != reference:
            raise SystemExit(f"{name} returned {len(audio)} bytes that differ from the "
                             f"{len(reference)} bytes in-process returned")
    return len(reference)


def measure_latency(calls: dict[str, Callable[[], bytes]], samples: int,
                    warmup: int) -> dict[str, list[float]]:
    """Microseconds per call for each path, sampled in rotating batches."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    gc.collect()
    gc.disable()  # the client's own collector pauses are not what is measured
    try:
        for round_ in range(math.ceil(samples / BATCH)):
            # Rotate the order so no path always runs right after the same other one.
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                call, out = calls[name], times[name]
                for _ in range(BATCH):
                    started = time.perf_counter_ns()
                    call()
                    out.append((time.perf_counter_ns() - started) / 1000)
    finally:
        gc.enable()
    return {name: values[:samples] for name, values in times.items()}


async def measure_throughput(port: int, concurrency: int, seconds: float,
                             audio_bytes: int) -> tuple[float, int]:
    """(completed requests per wall second, errors) with ``concurrency`` requests in flight;
    an answer that is not a 200 with the expected audio length counts as an error."""
    url = f"http://127.0.0.1:{port}{SPEECH_PATH}"
    body = json.dumps(BODY).encode()
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> bool:
            try:
                async with session.post(url, data=body, headers=HEADERS) as response:
                    data = await response.read()
                    return response.status == 200 and len(data) == audio_bytes
            except (aiohttp.ClientError, TimeoutError):
                return False

        # Untimed: opens every connection and warms the path at this concurrency.
        warm = await asyncio.gather(*(one() for _ in range(concurrency)))
        errors = warm.count(False)
        done = 0
        deadline = loop.time() + seconds

        async def client() -> None:
            nonlocal done, errors
            while loop.time() < deadline:
                if await one():
                    done += 1
                else:
                    errors += 1

        started = loop.time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        # Wall time includes the requests still in flight at the deadline, as they count.
        return done / (loop.time() - started), errors


# --------------------------------------------------------------------------- report


def print_machine() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {os.cpu_count()} CPUs ({cpus} usable), {platform.system()} "
          f"{platform.machine()}, Python {platform.python_version()}, aiohttp "
          f"{aiohttp.__version__}, msgpack {'.'.join(map(str, msgpack.version))}, "
          f"event loop {event_loop.name()} (every server here runs on it)")


def print_latency(times: dict[str, list[float]], audio_bytes: int) -> None:
    baseline, _ = summary(times[IN_PROCESS])
    rows = []
    for name, values in times.items():
        median, tail = summary(values)
        added: float | str = "baseline" if name == IN_PROCESS else median - baseline
        rows.append([name, median, tail, added])
    print_table(f"small call latency: {len(times[IN_PROCESS])} samples per path, "
                f"{audio_bytes} bytes of audio each",
                ["path", "median µs", "p99 µs", "added over in-process µs"], rows)
    supervisor, proxy = summary(times[SUPERVISOR])[0], summary(times[PROXY])[0]
    added = supervisor - baseline
    print(f"\ntarget: supervisor hop adds <= {TARGET_ADDED_US:.0f} µs at the median over "
          f"in-process: {added:+.0f} µs -> {_met(added <= TARGET_ADDED_US)}")
    print(f"target: supervisor hop faster than the HTTP proxy hop at the median: "
          f"{supervisor:.0f} µs vs {proxy:.0f} µs -> {_met(supervisor < proxy)}")
    threaded, proxy_t = summary(times[IN_PROCESS_T])[0], summary(times[PROXY_T])[0]
    print(f"with the model in a thread everywhere: supervisor hop adds "
          f"{supervisor - threaded:+.0f} µs over in-process; {supervisor:.0f} µs vs "
          f"{proxy_t:.0f} µs for the proxy hop (for reference; the targets are the two above)")


def print_throughput(results: dict[str, dict[int, tuple[float, int]]], seconds: float) -> None:
    rows = []
    for name, cells in results.items():
        rows.append([name, *(cells[c][0] for c in CONCURRENCY),
                     sum(errors for _, errors in cells.values())])
    print_table(f"requests per second ({seconds:g} s per cell, one aiohttp client process)",
                ["path", *(f"c={c} req/s" for c in CONCURRENCY), "errors"], rows)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> None:
    server = ServerProcess(config(), workdir)
    stack.callback(server.stop)
    server.request("POST", "/api/v1/load", {"model_name": MODEL})
    in_process = stack.enter_context(Helper(serve_in_process))
    backend = stack.enter_context(Helper(serve_in_process))
    proxy = stack.enter_context(Helper(serve_proxy, backend.address))
    in_process_t = stack.enter_context(Helper(serve_in_process, True))
    backend_t = stack.enter_context(Helper(serve_in_process, True))
    proxy_t = stack.enter_context(Helper(serve_proxy, backend_t.address))
    raw = stack.enter_context(Helper(serve_raw, str(workdir / "raw.sock")))
    ports = {SUPERVISOR: server.port, IN_PROCESS: in_process.address, PROXY: proxy.address,
             IN_PROCESS_T: in_process_t.address, PROXY_T: proxy_t.address}

    paths: dict[str, HttpPath | RawPath] = {name: HttpPath(p) for name, p in ports.items()}
    paths[RAW] = RawPath(raw.address)
    for path in paths.values():
        stack.callback(path.close)
    audio_bytes = check_same_audio(paths)
    row = server.model_row(MODEL)
    print(f"small call: {TEXT!r} -> {audio_bytes} bytes of WAV; synthetic options {OPTIONS}")
    print(f"supervisor: worker pid {row['pid']}, max_concurrency {Recipe.max_concurrency} (the "
          f"recipe default: more requests wait in the supervisor; the other paths have no cap)")

    times = measure_latency({n: p.call for n, p in paths.items()}, args.requests, args.warmup)
    print_latency(times, audio_bytes)

    results: dict[str, dict[int, tuple[float, int]]] = {name: {} for name in ports}
    for concurrency in CONCURRENCY:
        for name, port in ports.items():
            results[name][concurrency] = asyncio.run(
                measure_throughput(port, concurrency, args.seconds, audio_bytes))
    print_throughput(results, args.seconds)
    if server.model_row(MODEL)["pid"] != row["pid"]:
        print("\nnote: the supervisor's worker was replaced during the run")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="latency samples per path")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput cell")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per path")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 300 samples, 1 s cells, 50 warm-up calls")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.warmup = 300, 1.0, 50
    # asyncio.run turns Ctrl-C into a cancellation of its main task, which a cell can absorb
    # (the run then goes on against a supervisor that got the SIGINT too); a plain
    # KeyboardInterrupt always ends the run, and the exit stack then stops every server.
    signal.signal(signal.SIGINT, _interrupt)
    print_machine()
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            # The stack stops every server and helper, in reverse order, on errors too.
            run(args, Path(tmp), stack)
    except KeyboardInterrupt:
        print("\ninterrupted; every server was stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
