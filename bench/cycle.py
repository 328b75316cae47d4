"""One synthetic load / call / unload cycle through the real Manager: spawned vs forked workers.

Two managers run side by side, one with ``zygotes = "off"`` (every worker is a fresh
``python -m workers``) and one with ``zygotes = "lazy"`` (workers are forked from the
synthetic kind's zygote; its one-time start is done before timing), and the cycles alternate
between them. Each cycle loads the synthetic tts kind, makes one speech call and retires the
worker (shutdown, reap). ``hello`` is the time from asking for a process to its hello on the
socket, as the manager records it. Prints medians and p99, and the issue's target: a worker
forked from a zygote says hello within 100 ms.

Run: ``.venv/bin/python bench/cycle.py [--cycles 30] [--memory-mb 0]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import print_table, summary

from supervisor.config import load_settings
from supervisor.manager import Manager
from workers import event_loop

CONFIG = """
[server]
auto_unload_timer = "never"
stop_grace = "5s"
zygotes = "{zygotes}"
[models.tone]
recipe = "synthetic"
type = "tts"
[models.tone.options]
memory_mb = {memory_mb}
"""
MODES = {"spawn": "off", "fork": "lazy"}
PHASES = ("hello", "load", "call", "unload", "cycle")
HELLO_TARGET_MS = 100.0


async def cycle(manager: Manager) -> dict[str, float]:
    t0 = time.perf_counter()
    slot = await manager.ensure_ready("tone")
    t1 = time.perf_counter()
    hello = float(slot.info["hello_seconds"])
    try:
        call = slot.channel.call("speech", {"input": "hello"}, timeout_s=30)
        async with call:
            await call.collect()
    finally:
        manager.release(slot)
    t2 = time.perf_counter()
    await manager.unload("tone")
    t3 = time.perf_counter()
    return {"hello": hello, "load": t1 - t0, "call": t2 - t1, "unload": t3 - t2,
            "cycle": t3 - t0}


async def run(cycles: int, memory_mb: int, tmp: Path) -> dict[str, dict[str, list[float]]]:
    managers: dict[str, Manager] = {}
    try:
        for name, mode in MODES.items():
            path = tmp / f"{name}.toml"
            path.write_text(CONFIG.format(zygotes=mode, memory_mb=memory_mb))
            managers[name] = Manager(load_settings(cli={"config": str(path)}, env={}))
            await managers[name].start()
            await cycle(managers[name])  # untimed: starts the zygote, warms the page cache
        times = {name: {phase: [] for phase in PHASES} for name in MODES}
        for _ in range(cycles):
            for name, manager in managers.items():  # alternate: noise hits both alike
                for phase, seconds in (await cycle(manager)).items():
                    times[name][phase].append(seconds * 1000)
        return times
    finally:
        for manager in managers.values():
            await manager.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--memory-mb", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = event_loop.run(run(args.cycles, args.memory_mb, Path(tmp)))
    rows = []
    for phase in PHASES:
        spawn, fork = summary(times["spawn"][phase]), summary(times["fork"][phase])
        rows.append([phase, spawn[0], spawn[1], fork[0], fork[1], spawn[0] / fork[0]])
    print_table(f"synthetic tts through the manager, memory_mb={args.memory_mb}, "
                f"{args.cycles} cycles each, alternating (ms)",
                ["phase", "spawn median", "spawn p99", "fork median", "fork p99",
                 "spawn / fork"], rows)
    hello = summary(times["fork"]["hello"])
    verdict = "met" if hello[1] <= HELLO_TARGET_MS else "NOT met"
    print(f"\ntarget: a forked worker says hello within {HELLO_TARGET_MS:.0f} ms: median "
          f"{hello[0]:.1f} ms, p99 {hello[1]:.1f} ms -> {verdict}")


if __name__ == "__main__":
    main()
