"""Kokoro-82M through the whole server: cold load, first audio byte, real-time factor, memory,
and how long an unload takes until the worker process is gone.

Starts a real ``lemonade serve`` on a free port with one ``kokoro`` model (random weights by
default: the real architecture, so the figures hold for the real weights on the same device),
then for each round: a cold streamed request (the model is not loaded), a warm streamed
request, and an unload. Prints medians over the rounds.

Run: ``.venv/bin/python bench/kokoro_speech.py [--rounds 3] [--device auto] [--weights random]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from harness import ServerProcess, stream_speech

TEXT = ("The quick brown fox jumps over the lazy dog. Lemonade keeps each model in its own "
        "process, and unloading a model ends that process. Every byte of its memory goes "
        "back to the machine.")
CONFIG = """
[server]
auto_unload_timer = "never"
[models.kokoro]
recipe = "kokoro"
device = "{device}"
[models.kokoro.options]
weights = "{weights}"
"""


class Server(ServerProcess):
    def speak(self) -> tuple[float, float, int]:
        """(seconds to the first audio byte, seconds to the last, audio bytes) for TEXT."""
        result = stream_speech(self.port, {"model": "kokoro", "input": TEXT, "stream": True,
                                           "response_format": "pcm"})
        return result["first_byte_s"], result["total_s"], result["bytes"]

    def row(self) -> dict[str, Any]:
        return self.model_row("kokoro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default="random")
    args = parser.parse_args()
    results: dict[str, list[float]] = {k: [] for k in (
        "cold load (s)", "cold first byte (s)", "warm first byte (s)", "warm real-time factor",
        "worker RSS (MiB)", "worker VRAM (MiB)", "unload until pid gone (ms)")}
    info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(CONFIG.format(device=args.device, weights=args.weights), Path(tmp))
        try:
            for _ in range(args.rounds):
                cold_ttfb, _, _ = server.speak()
                row = server.row()
                info = row["info"]
                results["cold load (s)"].append(row["load_seconds"])
                results["cold first byte (s)"].append(cold_ttfb)
                ttfb, total_s, nbytes = server.speak()
                audio_s = nbytes / 2 / 24000
                results["warm first byte (s)"].append(ttfb)
                results["warm real-time factor"].append(total_s / audio_s)
                row = server.row()
                results["worker RSS (MiB)"].append(row["memory"]["rss_bytes"] / 2**20)
                results["worker VRAM (MiB)"].append((row["memory"]["vram_bytes"] or 0) / 2**20)
                pid = row["pid"]
                started = time.perf_counter()
                server.request("POST", "/api/v1/unload", {"model_name": "kokoro"})
                while psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
                    time.sleep(0.001)
                results["unload until pid gone (ms)"].append(
                    (time.perf_counter() - started) * 1000)
        finally:
            server.stop()
    print(f"Kokoro-82M, weights={args.weights}, device={info.get('device', args.device)}, "
          f"g2p={info.get('g2p')}, {args.rounds} rounds, {psutil.cpu_count()} CPUs")
    print(f"{'measure':32} {'median':>10} {'min':>10} {'max':>10}")
    for name, values in results.items():
        print(f"{name:32} {statistics.median(values):10.3f} {min(values):10.3f} "
              f"{max(values):10.3f}")
    print("real-time factor = synthesis time / audio duration (below 1 is faster than real time)")


if __name__ == "__main__":
    main()
