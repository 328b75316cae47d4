"""Per-device budgets and placement with real worker processes, on a machine without a GPU.

The GPUs here are STAND-INS: devices declared in the config (which is how NPU users and
machines without NVML describe theirs) or read from ``devices.StandInProbe``'s JSON file, and
synthetic workers with ``stand_in_vram_mb`` report a VRAM figure on the device they were
placed on without touching any GPU. What is real: the processes, the placement decisions,
the evictions, the waits and the status figures.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.config_values import ConfigError
from supervisor.devices import NoGpuProbe, StandInProbe
from supervisor.errors import Conflict
from supervisor.lifecycle import State
from supervisor.manager import Manager
from supervisor.status import device_rows, model_rows
from tests.helpers import process_gone, settings_from_toml, wait_for

MiB = 1024 * 1024


def gpu_model(name: str, vram_mb: int, **fields: Any) -> str:
    lines = [f"[models.{name}]", 'recipe = "synthetic"', 'type = "tts"',
             f'vram = "{vram_mb}MiB"']
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in fields.items()]
    lines += [f"[models.{name}.options]", f"stand_in_vram_mb = {vram_mb}"]
    return "\n".join(lines) + "\n"


SERVER = '[server]\nauto_unload_timer = "never"\nstop_grace = "2s"\nmemory_budget = "none"\n'
TWO_GPUS = (SERVER + '[devices."cuda:0"]\nmemory = "1000MiB"\n'
            '[devices."cuda:1"]\nmemory = "300MiB"\n')

Factory = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Factory]:
    managers: list[Manager] = []

    async def factory(text: str, probe: Any = None) -> Manager:
        manager = Manager(settings_from_toml(tmp_path, text), probe=probe or NoGpuProbe())
        await manager.start()
        managers.append(manager)
        return manager

    yield factory
    for manager in managers:
        pids = [s.pid for s in manager.slots.values() if s.pid is not None]
        await manager.close()
        for pid in pids:
            assert process_gone(pid)


async def load(manager: Manager, name: str) -> int:
    async with manager.use(name) as lease:
        return lease.pid


async def test_auto_models_land_on_the_gpu_with_room(make: Factory) -> None:
    manager = await make(TWO_GPUS + gpu_model("big", 600) + gpu_model("mid", 250)
                         + gpu_model("small", 250))
    await load(manager, "big")  # only cuda:0 can hold 600 MiB
    await load(manager, "mid")  # both can: cuda:0 has 400 MiB left, cuda:1 300
    await load(manager, "small")  # now only cuda:1 fits it without an eviction
    placed = {name: manager.slots[name].placed_device for name in ("big", "mid", "small")}
    assert placed == {"big": "cuda:0", "mid": "cuda:0", "small": "cuda:1"}
    # The worker was told its device and reports its VRAM there.
    rows = {row["name"]: row for row in model_rows(manager)}
    assert rows["small"]["device"] == "cuda:1"
    assert rows["small"]["memory_by_device"]["cuda:1"] == 250 * MiB
    devices = {row["name"]: row for row in device_rows(manager)}
    assert devices["cuda:0"]["used_by_models_bytes"] == 850 * MiB
    assert devices["cuda:1"]["used_by_models_bytes"] == 250 * MiB
    assert all(s.state is State.READY for s in manager.slots.values())


async def test_a_full_gpu_evicts_only_models_on_that_gpu(make: Factory) -> None:
    cpu_model = ('[models.cpu1]\nrecipe = "synthetic"\ntype = "tts"\ndevice = "cpu"\n'
                 'memory = "50MiB"\n')
    manager = await make(TWO_GPUS + cpu_model + gpu_model("a", 600, device="cuda:0")
                         + gpu_model("other", 200, device="cuda:1")
                         + gpu_model("b", 500, device="cuda:0"))
    cpu_pid = await load(manager, "cpu1")
    a_pid = await load(manager, "a")
    other_pid = await load(manager, "other")
    await load(manager, "b")
    assert manager.slots["a"].state is State.UNLOADED
    assert manager.slots["a"].last_eviction["reason"] == "memory"  # type: ignore[index]
    assert process_gone(a_pid)
    assert manager.slots["cpu1"].pid == cpu_pid and manager.slots["other"].pid == other_pid


async def test_a_model_larger_than_its_device_is_a_409_naming_it(make: Factory) -> None:
    manager = await make(TWO_GPUS + gpu_model("huge", 400, device="cuda:1"))
    with pytest.raises(Conflict) as caught:
        await load(manager, "huge")
    assert "cuda:1" in caught.value.message and "400 MiB" in caught.value.message
    assert "300 MiB" in caught.value.message
    assert manager.spawns == 0  # refused before any process started


async def test_auto_falls_back_to_the_cpu_only_when_allowed(make: Factory) -> None:
    manager = await make(TWO_GPUS + gpu_model("wide", 2000) + gpu_model("strict", 2000,
                                                                         fallback="none"))
    await load(manager, "wide")
    assert manager.slots["wide"].placed_device == "cpu"
    assert manager.slots["wide"].device == "cpu"  # the worker ran on the CPU
    with pytest.raises(Conflict):
        await load(manager, "strict")


async def test_a_recipe_on_a_device_that_does_not_exist_is_a_config_error(
        tmp_path: Path) -> None:
    text = TWO_GPUS + gpu_model("lost", 100, device="cuda:5")
    with pytest.raises(ConfigError) as caught:
        Manager(settings_from_toml(tmp_path, text), probe=NoGpuProbe())
    assert "[models.lost] device" in str(caught.value) and "cuda:5" in str(caught.value)


async def test_without_a_gpu_probe_a_recipe_on_a_gpu_runs_unbudgeted(make: Factory) -> None:
    # No NVML and no [devices] table: nothing can say whether cuda:0 exists, so the model is
    # not refused; it goes to the worker as written and is charged to the CPU as before.
    manager = await make(SERVER + gpu_model("plain", 100, device="cuda:0"))
    await load(manager, "plain")
    assert manager.slots["plain"].state is State.READY


async def test_a_budget_for_a_gpu_the_probe_does_not_see_is_a_config_error(
        tmp_path: Path) -> None:
    probe_file = tmp_path / "gpus.json"
    probe_file.write_text(json.dumps({"gpus": [{"index": 0, "total": 1024 * MiB}]}))
    text = SERVER + '[devices."cuda:7"]\nmemory = "8GiB"\n'
    with pytest.raises(ConfigError) as caught:
        Manager(settings_from_toml(tmp_path, text), probe=StandInProbe(str(probe_file)))
    assert "cuda:7" in str(caught.value) and "cuda:0" in str(caught.value)


def write_probe(path: Path, *, used_mb: int, processes: dict[int, int] | None = None) -> None:
    path.write_text(json.dumps({"gpus": [{
        "index": 0, "total": 1024 * MiB, "used": used_mb * MiB,
        "processes": {str(pid): mb * MiB for pid, mb in (processes or {}).items()},
    }]}))


async def test_other_programs_on_the_gpu_count_against_its_budget(
        make: Factory, tmp_path: Path) -> None:
    probe_file = tmp_path / "gpus.json"
    write_probe(probe_file, used_mb=600, processes={999_999: 600})  # somebody else's 600 MiB
    config = (SERVER + '[devices."cuda:0"]\nmemory = "1GiB"\nheadroom = "0"\n'
              + gpu_model("m", 500, device="cuda:0"))
    manager = await make(config, probe=StandInProbe(str(probe_file)))
    with pytest.raises(Conflict) as caught:
        await load(manager, "m")
    assert "cuda:0" in caught.value.message and "424 MiB" in caught.value.message
    assert "other programs hold 600 MiB on cuda:0" in caught.value.message
    devices = {row["name"]: row for row in device_rows(manager)}
    assert devices["cuda:0"]["used_by_others_bytes"] == 600 * MiB
    write_probe(probe_file, used_mb=0)  # the other program ended
    manager.refresh_memory()
    await load(manager, "m")


async def test_the_next_load_waits_until_the_driver_shows_the_memory_free(
        make: Factory, tmp_path: Path) -> None:
    probe_file = tmp_path / "gpus.json"
    write_probe(probe_file, used_mb=0)
    config = (SERVER.replace('stop_grace = "2s"', 'stop_grace = "2s"\nvram_release_wait = "30s"')
              + '[devices."cuda:0"]\nmemory = "1GiB"\nheadroom = "0"\n'
              + gpu_model("first", 300, device="cuda:0")
              + gpu_model("second", 300, device="cuda:0"))
    manager = await make(config, probe=StandInProbe(str(probe_file)))
    pid = await load(manager, "first")
    write_probe(probe_file, used_mb=300, processes={pid: 300})  # the driver lists our worker
    manager.refresh_memory()
    assert manager.slots["first"].vram_bytes == 300 * MiB  # the driver's figure
    await manager.unload("first")
    assert process_gone(pid)  # the process is gone; the stand-in driver still lists it
    loading = asyncio.ensure_future(load(manager, "second"))
    def waiting() -> bool:
        progress = manager.load_progress.get("second")
        return progress is not None and "waiting for cuda:0" in (progress.phase or "")

    await wait_for(waiting, 30, "the load to wait for cuda:0's memory")
    await asyncio.sleep(0.3)
    assert not loading.done() and manager.slots["second"].pid is None
    write_probe(probe_file, used_mb=0)  # the driver let go
    await asyncio.wait_for(loading, 30)
    assert manager.slots["second"].placed_device == "cuda:0"
