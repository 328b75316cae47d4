"""Small builders shared by the integration tests: settings from TOML text, process checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
import pytest

from supervisor.config import Settings, load_settings

#: Pids whose descendants the leak guard leaves alone: a module-scoped fixture's process that
#: starts and ends children by itself between tests (a browser); the fixture ends the tree.
LONG_LIVED_PROCESSES: set[int] = set()


def shared_data_dir(factory: pytest.TempPathFactory) -> Path:
    """One data dir per test session, so converted weights (the LLM's GGUF) are built once
    for every test that loads the model, whichever runs first."""
    path = factory.getbasetemp() / "lemonade-shared-data"
    path.mkdir(exist_ok=True)
    return path


def settings_from_toml(
    tmp_path: Path, text: str, *, env: Mapping[str, str] | None = None
) -> Settings:
    path = tmp_path / "lemonade.toml"
    path.write_text(text)
    return load_settings(cli={"config": str(path)}, env=dict(env or {}), cwd=tmp_path)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists at all (not even as a zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> float:
    """Poll until ``predicate()``; returns the seconds it took, fails with ``what``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"timed out after {limit_s}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started
