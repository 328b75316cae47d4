"""A randomised mix of everything at once, under a watchdog: every request ends, nothing sticks.

Clients speak (some leave mid-answer), models are loaded, unloaded one by one and all at once,
workers are SIGKILLed, idle timeouts change, and the config is reloaded with models added,
removed and changed, all concurrently on real synthetic workers. The watchdog holds every
operation to a deadline (an operation that does not end is a hang: the test fails naming it),
and the liveness check (``/api/v1/health``'s) must find nothing stuck at any point. At the
end the manager's books must balance. A model that can never fit is in the mix too: it must
be refused every time without evicting anybody or spawning.

Every failure names the seed (``LEMONADE_SOAK_SEED=N`` replays it, timing aside) and, for a
hang, the await chain of every load and retire task. ``--soak`` runs 600 operations, not 80.

The first run of this test found a real deadlock: a load cancelled while its worker was being
forked killed the worker's process group before the child had made it (``setsid``), so the
child lived on, and the reap, the load and every load queued behind it waited forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path

from supervisor import reload
from supervisor.errors import Conflict, LemonadeError
from supervisor.liveness import stalls
from supervisor.manager import Manager
from tests.conftest import soak_size
from tests.helpers import settings_from_toml

#: Generous for a busy 2-core machine: catching hangs, not measuring speed.
OP_DEADLINE_S = 60.0

MODELS = {
    "a": {"load_seconds": 0.2, "latency_ms": 100, "chunks": 3},
    "b": {"load_seconds": 0.1, "latency_ms": 300, "chunks": 4},
    "c": {"latency_ms": 50},
}


def _config(models: dict[str, dict[str, float]], *, budget_note: str = "") -> str:
    lines = ['[server]', 'auto_unload_timer = "2s"', 'stop_grace = "0.5s"',
             'drain_timeout = "5s"', 'max_loaded_models = 2', 'memory_budget = "4GiB"',
             'load_failure_cooldown = "0.2s"', budget_note]
    for name, options in models.items():
        lines += [f"[models.{name}]", 'recipe = "synthetic"', 'type = "tts"']
        lines += [f"[models.{name}.options]"] + [f"{k} = {v}" for k, v in options.items()]
    # Larger than the whole budget: refused at once, every time, never evicting anybody.
    lines += ["[models.huge]", 'recipe = "synthetic"', 'type = "tts"', 'memory = "64GiB"']
    return "\n".join(lines) + "\n"


def _load_and_retire_stacks() -> str:
    """The await chain of every load and retire task, innermost last."""
    lines = []
    for task in asyncio.all_tasks():
        if not task.get_name().startswith(("load-", "retire-")):
            continue
        lines.append(f"task {task.get_name()}")
        coro: object = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None)
            if frame is None:
                lines.append(f"  awaiting {coro!r:.200}")
                break
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None)
    return "\n".join(lines)


async def _speak(manager: Manager, name: str, rng: random.Random) -> None:
    async with manager.use(name) as lease:
        call = lease.channel.call("speech", {"input": "soak", "response_format": "pcm",
                                             "stream": True}, timeout_s=30)
        async with call:
            leave_after = rng.choice([None, 0, 1])  # a client that leaves mid-answer
            seen = 0
            async for _ in call:
                seen += 1
                if leave_after is not None and seen > leave_after:
                    break


async def _kill_a_worker(manager: Manager, rng: random.Random) -> None:
    pids = [s.pid for s in manager.slots.values() if s.pid is not None]
    if pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rng.choice(pids), signal.SIGKILL)


async def _reload(manager: Manager, tmp_path: Path, rng: random.Random) -> None:
    models = {name: dict(options) for name, options in MODELS.items()}
    if rng.random() < 0.5:
        models.pop(rng.choice(sorted(models)))  # removed
    if rng.random() < 0.5:
        models["d"] = {"latency_ms": 20}  # added
    changed = rng.choice(sorted(models))
    models[changed]["latency_ms"] = rng.choice([20, 80, 150])  # changed recipe
    reload.apply(manager, settings_from_toml(tmp_path, _config(models)))


def _pick(manager: Manager, rng: random.Random) -> tuple[str, str]:
    names = [n for n, s in manager.slots.items() if not s.removed]
    op = rng.choices(["speak", "load", "unload", "unload_all", "kill", "timeout", "reload",
                      "huge"], weights=[10, 3, 3, 1, 2, 2, 2, 1])[0]
    return op, rng.choice(names)


async def _one(manager: Manager, tmp_path: Path, rng: random.Random, op: str,
               name: str) -> str:
    try:
        if op == "speak":
            await _speak(manager, name, rng)
        elif op == "load":
            await manager.load(name)
        elif op == "unload":
            await manager.unload(name)
        elif op == "unload_all":
            await manager.unload_all()
        elif op == "kill":
            await _kill_a_worker(manager, rng)
        elif op == "timeout":
            manager.set_idle_timeout(rng.choice([None, name]), rng.choice([0.3, 2.0, 60.0]))
        elif op == "reload":
            await _reload(manager, tmp_path, rng)
        elif op == "huge":
            try:
                await manager.load("huge")
            except Conflict:
                pass  # refused at once (that it never spawned is checked from the events)
            else:
                raise AssertionError("a model larger than the budget was loaded")
    except LemonadeError:
        pass  # a clear error (404 after a removal, 502 after a kill, 503 busy) is an answer
    return op


async def test_everything_at_once_ends_and_nothing_sticks(tmp_path: Path) -> None:
    seed = int(os.environ.get("LEMONADE_SOAK_SEED", random.randrange(2**32)))
    size = soak_size(80, 600)
    rng = random.Random(seed)
    manager = Manager(settings_from_toml(tmp_path, _config(MODELS)))
    await manager.start()
    spawned: list[str] = []
    manager.events.listen(
        lambda e: spawned.append(e["model"]) if e["event"] == "spawned" else None)
    problems: list[str] = []

    async def watchdog() -> None:
        while True:
            problems.extend(stalls(manager))
            await asyncio.sleep(0.2)

    watching = asyncio.ensure_future(watchdog())
    try:
        pending: set[asyncio.Task[str]] = set()
        async def bounded(i: int, op: str, name: str) -> str:
            try:
                return await asyncio.wait_for(_one(manager, tmp_path, rng, op, name),
                                              OP_DEADLINE_S)
            except TimeoutError:
                states = {n: s.state.value for n, s in manager.slots.items()}
                raise AssertionError(f"seed {seed}: operation {i} ({op} {name}) did not end "
                                     f"within {OP_DEADLINE_S:g}s; states {states}\n"
                                     f"{_load_and_retire_stacks()}") from None

        for i in range(size):
            op, name = _pick(manager, rng)
            pending.add(asyncio.ensure_future(bounded(i, op, name)))
            if len(pending) >= 6:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    finished.result()
            await asyncio.sleep(rng.random() * 0.05)
        for finished in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(finished, BaseException):
                raise finished
        assert problems == [], f"seed {seed}: the liveness check found {problems[:3]}"
        assert "huge" not in spawned, "a model that can never fit was spawned"
        assert spawned, "the mix never loaded anything"
    finally:
        watching.cancel()
        await manager.close()
    assert manager.audit() == [], f"seed {seed}"
