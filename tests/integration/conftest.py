"""Fixtures for tests that drive a real Manager with real synthetic worker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest

from supervisor.lifecycle import State
from supervisor.manager import Manager
from tests.helpers import process_gone, settings_from_toml

ManagerFactory = Callable[..., Awaitable[Manager]]


@pytest.fixture
async def make_manager(tmp_path: Path) -> AsyncIterator[ManagerFactory]:
    """Build and start a Manager from TOML text; closes it and checks its books afterwards."""
    managers: list[Manager] = []

    async def factory(text: str, env: Mapping[str, str] | None = None) -> Manager:
        manager = Manager(settings_from_toml(tmp_path, text, env=env))
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in managers:
        pids = [s.pid for s in manager.slots.values() if s.pid is not None]
        await manager.close()
        for slot in manager.slots.values():
            assert slot.state in (State.UNLOADED, State.FAILED), (slot.name, slot.state)
            assert not slot.timer.armed, f"idle timer still armed for {slot.name}"
            assert slot.in_flight == 0 and slot.waiters == 0, slot.name
            assert slot.reserved_bytes == 0 and not slot.admitted, slot.name
        for pid in pids:
            assert process_gone(pid), f"worker {pid} outlived Manager.close()"
