"""How long one synthetic load / call / unload cycle takes, measured through the real Manager.

Prints a table of medians and p95 over repeated cycles. Each cycle spawns a real worker
process (``python -m workers``), loads the synthetic tts kind, makes one speech call, and
retires the worker (shutdown, reap). Run: ``.venv/bin/python bench/cycle.py [--cycles N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from supervisor.config import load_settings
from supervisor.manager import Manager

CONFIG = """
[server]
auto_unload_timer = "never"
stop_grace = "5s"
[models.tone]
recipe = "synthetic"
type = "tts"
[models.tone.options]
memory_mb = {memory_mb}
"""


async def run(cycles: int, memory_mb: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lemonade.toml"
        path.write_text(CONFIG.format(memory_mb=memory_mb))
        manager = Manager(load_settings(cli={"config": str(path)}, env={}))
        await manager.start()
        times: dict[str, list[float]] = {"load": [], "call": [], "unload": [], "cycle": []}
        try:
            for _ in range(cycles):
                t0 = time.perf_counter()
                slot = await manager.ensure_ready("tone")
                t1 = time.perf_counter()
                try:
                    call = slot.channel.call("speech", {"input": "hello"}, timeout_s=30)
                    async with call:
                        await call.collect()
                finally:
                    manager.release(slot)
                t2 = time.perf_counter()
                await manager.unload("tone")
                t3 = time.perf_counter()
                for key, value in (("load", t1 - t0), ("call", t2 - t1),
                                   ("unload", t3 - t2), ("cycle", t3 - t0)):
                    times[key].append(value)
        finally:
            await manager.close()
    return times


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--memory-mb", type=int, default=0)
    args = parser.parse_args()
    times = asyncio.run(run(args.cycles, args.memory_mb))
    print(f"synthetic tts, memory_mb={args.memory_mb}, {args.cycles} cycles")
    print(f"{'phase':<8}{'median ms':>12}{'p95 ms':>10}{'min ms':>10}")
    for phase, values in times.items():
        print(f"{phase:<8}{statistics.median(values) * 1e3:>12.1f}"
              f"{p95(values) * 1e3:>10.1f}{min(values) * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
