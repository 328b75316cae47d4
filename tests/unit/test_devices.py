"""The device inventory with a probe the test drives: budgets from "auto" and headroom, other
programs' memory, declared devices, and the wait for a GPU's memory to come back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from supervisor.config_values import ConfigError
from supervisor.devices import DEFAULT_GPU_HEADROOM, GpuReading, Inventory
from tests.helpers import settings_from_toml

MiB = 1024 * 1024
MODEL = '[models.m]\nrecipe = "synthetic"\ntype = "tts"\n'


class DrivenProbe:
    """What NVML would say, set by the test."""

    source = "test"

    def __init__(self, *gpus: GpuReading) -> None:
        self.gpus = list(gpus)

    def read(self) -> list[GpuReading]:
        return list(self.gpus)


def gpu(index: int, total_mb: int, used_mb: int = 0,
        processes: dict[int, int] | None = None) -> GpuReading:
    return GpuReading(f"cuda:{index}", "test GPU", total_mb * MiB, used_mb * MiB,
                      {pid: mb * MiB for pid, mb in (processes or {}).items()})


def test_auto_is_the_total_less_the_default_headroom(tmp_path: Path) -> None:
    inventory = Inventory(settings_from_toml(tmp_path, MODEL), DrivenProbe(gpu(0, 16384)))
    assert inventory.gpus == ["cuda:0"]
    assert inventory.budgets() == {"cuda:0": 16384 * MiB - DEFAULT_GPU_HEADROOM}


def test_a_declared_size_and_headroom_and_other_programs(tmp_path: Path) -> None:
    config = '[devices."cuda:0"]\nmemory = "8GiB"\nheadroom = "1GiB"\n' + MODEL
    probe = DrivenProbe(gpu(0, 10240, used_mb=2048, processes={4242: 2048}))
    inventory = Inventory(settings_from_toml(tmp_path, config), probe)
    inventory.refresh(our_pids=[])
    # 10 GiB total - 1 GiB headroom - 2 GiB of somebody else's = 7 GiB < the declared 8 GiB.
    assert inventory.budgets() == {"cuda:0": 7168 * MiB}
    inventory.refresh(our_pids=[4242])  # now that process is one of our workers
    assert inventory.budgets() == {"cuda:0": 8192 * MiB}


def test_a_declared_device_without_a_probe_needs_a_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'memory = "auto" needs the device.s total'):
        Inventory(settings_from_toml(tmp_path, '[devices.npu]\nheadroom = "1GiB"\n' + MODEL),
                  DrivenProbe())
    inventory = Inventory(settings_from_toml(tmp_path, '[devices.npu]\nmemory = "4GiB"\n'
                                             + MODEL), DrivenProbe())
    assert inventory.budgets() == {"npu": 4096 * MiB}
    assert inventory.devices["npu"].seen is False


async def test_the_wait_ends_when_the_pid_is_gone_and_the_memory_is_back(
        tmp_path: Path) -> None:
    probe = DrivenProbe(gpu(0, 8192, used_mb=3000, processes={77: 3000}))
    inventory = Inventory(settings_from_toml(tmp_path, MODEL), probe)
    inventory.refresh(our_pids=[77])
    inventory.worker_left("cuda:0", 77, 3000 * MiB)
    assert inventory.releasing("cuda:0")
    waiting = asyncio.ensure_future(inventory.wait_released("cuda:0"))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the driver still lists pid 77
    probe.gpus = [gpu(0, 8192, used_mb=3000)]  # the pid is gone, its memory not yet
    await asyncio.sleep(0.3)
    assert not waiting.done()
    probe.gpus = [gpu(0, 8192, used_mb=40)]  # back, within the 64 MiB slack
    assert await asyncio.wait_for(waiting, 5) < 5
    assert not inventory.releasing("cuda:0")


async def test_the_wait_is_bounded(tmp_path: Path) -> None:
    config = '[server]\nvram_release_wait = "0.5s"\n' + MODEL
    probe = DrivenProbe(gpu(0, 8192, used_mb=3000, processes={77: 3000}))
    inventory = Inventory(settings_from_toml(tmp_path, config), probe)
    inventory.refresh(our_pids=[77])
    inventory.worker_left("cuda:0", 77, 3000 * MiB)
    started = time.monotonic()
    await inventory.wait_released("cuda:0")  # never released: it gives up, logged
    assert 0.5 <= time.monotonic() - started < 5
    assert not inventory.releasing("cuda:0")
