"""Fixtures for the fault-matrix tests (docs/fault-matrix.md): a real Manager, real synthetic
workers, and faults chosen by recipe options (``fault = "..."``, see workers/synthetic.py).

``models(**recipes)`` builds the TOML: each keyword is a model name, its value the synthetic
options; ``server`` holds ``[server]`` keys. Timeouts are short so every row runs in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.errors import LemonadeError
from supervisor.manager import Manager
from tests.helpers import process_gone, settings_from_toml

FAST_SERVER = {
    "auto_unload_timer": '"30s"',
    "stop_grace": '"1s"',
    "drain_timeout": '"5s"',
    "load_timeout": '"10s"',
    "call_timeout": '"10s"',
    "load_failure_cooldown": '"0.5s"',
    "heartbeat_interval": '"10s"',
    "heartbeat_timeout": '"2s"',
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def config_text(server: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
                recipe_keys: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    lines = ["[server]"]
    merged = {**FAST_SERVER, **{k: _toml_value(v) for k, v in server.items()}}
    lines += [f"{k} = {v}" for k, v in merged.items()]
    for name, options in models.items():
        lines += ["", f"[models.{name}]", 'recipe = "synthetic"', 'type = "tts"']
        for k, v in (recipe_keys or {}).get(name, {}).items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append(f"[models.{name}.options]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Outcome:
    """What one request ended with: exactly one of audio or error."""

    chunks: list[bytes] = field(default_factory=list)
    result: Any = None
    error: LemonadeError | None = None
    pid: int | None = None
    seconds: float = 0.0

    @property
    def status(self) -> int:
        return 200 if self.error is None else self.error.status


class Harness:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.pids: set[int] = set()

    async def speak(self, name: str, text: str = "hello there", *,
                    timeout_s: float | None = None, stop_after: int | None = None) -> Outcome:
        """One request through ``Manager.use``; never raises a LemonadeError, returns it."""
        out = Outcome()
        started = time.monotonic()
        terminal = 0
        try:
            async with self.manager.use(name) as lease:
                out.pid = lease.pid
                self.pids.add(lease.pid)
                limit = timeout_s or self.manager.settings.call_timeout_s
                async with lease.channel.call("speech", {"input": text, "response_format": "pcm"},
                                              timeout_s=limit) as call:
                    async for chunk in call:
                        out.chunks.append(chunk)
                        if stop_after is not None and len(out.chunks) >= stop_after:
                            break
                    out.result = call.result
                    terminal += 1
        except LemonadeError as e:
            out.error = e
            terminal += 1
        out.seconds = time.monotonic() - started
        assert terminal == 1, "a request must end exactly once"
        assert out.error is None or out.error.status != 500, out.error.message
        return out

    def pid_of(self, name: str) -> int | None:
        return self.manager.slots[name].pid


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    harnesses: list[Harness] = []

    async def factory(models: Mapping[str, Mapping[str, Any]], *,
                      server: Mapping[str, Any] | None = None,
                      recipe_keys: Mapping[str, Mapping[str, Any]] | None = None) -> Harness:
        text = config_text(server or {}, models, recipe_keys)
        manager = Manager(settings_from_toml(tmp_path, text))
        await manager.start()
        h = Harness(manager)
        harnesses.append(h)
        return h

    yield factory
    for h in harnesses:
        for slot in h.manager.slots.values():
            if slot.pid is not None:
                h.pids.add(slot.pid)
        await h.manager.close()
        assert h.manager.audit() == []
        for pid in h.pids:
            assert process_gone(pid), f"worker {pid} outlived Manager.close()"


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


async def wait_until(predicate: Callable[[], bool], limit_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"timed out after {limit_s}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started
