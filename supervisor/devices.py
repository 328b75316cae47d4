"""The devices models are placed on, their budgets, and what other programs hold on them.

``cpu`` is always there (its budget is ``memory_budget``). GPUs come from NVML through
``nvidia-ml-py`` (the optional ``gpu`` extra): without the package or a driver there are no
GPUs and nothing fails. A budget may also be declared for a device NVML does not see (an NPU,
or a GPU on a machine without NVML), which is how NPU users and the tests describe theirs.

A *probe* reads the GPUs: totals, what is used, and which processes hold how much. Three
exist: :class:`NvmlProbe` (the real one), :class:`NoGpuProbe`, and :class:`StandInProbe`, a
JSON file the tests rewrite to play a GPU that this machine does not have. The stand-in is
chosen only by ``LEMONADE_STAND_IN_GPU_PROBE`` and says so in every view.

What the planner gets per device is its *effective* budget: the declared (or ``auto``)
budget, lowered when other programs hold so much that the rest of the device no longer fits
it (``total - headroom - others``). After one of our GPU workers exits, :meth:`wait_released`
holds the next load on that device until the probe no longer lists the old pid and its memory
shows free again, for at most ``release_wait_s``: the driver can need a moment to hand VRAM
back after the process is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from supervisor.config import Recipe, Settings
from supervisor.config_values import ConfigError
from supervisor.device_config import DeviceBudget

log = logging.getLogger(__name__)

CPU = "cpu"
MiB = 1024 * 1024
#: Kept free on a GPU whose budget is "auto" unless its table says otherwise: the CUDA
#: context of a process that starts alongside, and fragmentation.
DEFAULT_GPU_HEADROOM = 512 * MiB
#: Memory that may stay "used" after a release: NVML's own bookkeeping moves by a few MiB.
RELEASE_SLACK = 64 * MiB
STAND_IN_ENV = "LEMONADE_STAND_IN_GPU_PROBE"


@dataclass(frozen=True)
class GpuReading:
    """One GPU as a probe saw it."""

    name: str  # "cuda:0"
    label: str  # "NVIDIA H200", or "stand-in"
    total_bytes: int
    used_bytes: int
    #: pid -> bytes on this GPU, for every process the driver lists.
    processes: Mapping[int, int] = field(default_factory=dict)


class DeviceProbe(Protocol):
    source: str

    def read(self) -> list[GpuReading]: ...


class NoGpuProbe:
    source = "none"

    def read(self) -> list[GpuReading]:
        return []


class NvmlProbe:
    """NVIDIA's management library: the figures ``nvidia-smi`` shows."""

    source = "nvml"

    def __init__(self) -> None:
        import pynvml  # the nvidia-ml-py package; ImportError when it is not installed

        pynvml.nvmlInit()  # NVMLError without a driver
        self._nvml = pynvml

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        out = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            processes: dict[int, int] = {}
            for getter in (nvml.nvmlDeviceGetComputeRunningProcesses,
                           nvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    for proc in getter(handle):
                        used = proc.usedGpuMemory if isinstance(proc.usedGpuMemory, int) else 0
                        processes[int(proc.pid)] = processes.get(int(proc.pid), 0) + used
                except nvml.NVMLError:
                    pass
            label = nvml.nvmlDeviceGetName(handle)
            out.append(GpuReading(
                name=f"cuda:{index}",
                label=label.decode() if isinstance(label, bytes) else str(label),
                total_bytes=int(memory.total), used_bytes=int(memory.used),
                processes=processes,
            ))
        return out


class StandInProbe:
    """A STAND-IN for NVML, for machines without a GPU: a JSON file describes the GPUs.

    ``{"gpus": [{"index": 0, "total": bytes, "used": bytes, "processes": {"pid": bytes}}]}``
    The file is read on every call, so a test changes what the "driver" reports by rewriting
    it. A missing or broken file reads as no GPUs (and is logged), never as a crash.
    """

    source = "stand-in"

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> list[GpuReading]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            return [
                GpuReading(
                    name=f"cuda:{int(gpu['index'])}",
                    label=str(gpu.get("label", "stand-in GPU")),
                    total_bytes=int(gpu["total"]), used_bytes=int(gpu.get("used", 0)),
                    processes={int(pid): int(n) for pid, n in gpu.get("processes", {}).items()},
                )
                for gpu in data.get("gpus", [])
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("stand-in GPU probe %s unreadable: %s", self.path, e)
            return []


def open_probe(env: Mapping[str, str] | None = None) -> DeviceProbe:
    env = os.environ if env is None else env
    path = env.get(STAND_IN_ENV)
    if path:
        log.warning("GPUs are read from the stand-in probe %s (%s), not from NVML",
                    path, STAND_IN_ENV)
        return StandInProbe(path)
    try:
        return NvmlProbe()
    except ImportError:
        return NoGpuProbe()
    except Exception as e:  # pynvml.NVMLError: no driver, no device
        log.info("NVML is not available (%s): no GPUs are managed", e)
        return NoGpuProbe()


@dataclass
class Device:
    """One device as the status views show it."""

    name: str
    label: str
    total_bytes: int | None
    budget_bytes: int | None  # declared or "auto", before other programs' use
    headroom_bytes: int
    seen: bool  # the probe lists it
    used_by_others_bytes: int = 0
    used_bytes: int | None = None  # everything the probe counts as used

    def effective_budget(self) -> int | None:
        """What our models may use now: the budget, less what other programs took from it."""
        if self.budget_bytes is None:
            return None
        if self.total_bytes is None:
            return self.budget_bytes
        room = self.total_bytes - self.headroom_bytes - self.used_by_others_bytes
        return max(0, min(self.budget_bytes, room))

    def free_bytes(self) -> int | None:
        if self.total_bytes is None or self.used_bytes is None:
            return None
        return max(0, self.total_bytes - self.used_bytes)


@dataclass
class _Release:
    pid: int
    used_before: int  # the device's used bytes while the worker still lived
    held: int  # what the worker held there


class Inventory:
    """The non-CPU devices: budgets, probe readings, and pending VRAM releases."""

    def __init__(self, settings: Settings, probe: DeviceProbe | None = None) -> None:
        self.probe = probe or open_probe()
        self.release_wait_s = settings.vram_release_wait_s
        self.devices: dict[str, Device] = {}
        self._releases: dict[str, _Release] = {}
        readings = {g.name: g for g in self._read()}
        for name, reading in sorted(readings.items()):
            declared = settings.devices.get(name)
            self.devices[name] = self._device(name, declared, reading)
        for name, declared in sorted(settings.devices.items()):
            if name in self.devices:
                continue
            if name.startswith("cuda") and readings:
                raise ConfigError(
                    f"{declared.where}: there is no GPU {name} on this machine (NVML sees "
                    f"{', '.join(sorted(readings))})")
            self.devices[name] = self._device(name, declared, None)
        self.check_recipes(settings.models.values())

    def _device(self, name: str, declared: DeviceBudget | None,
                reading: GpuReading | None) -> Device:
        memory = "auto" if declared is None else declared.memory
        if reading is None and memory == "auto":
            raise ConfigError(
                f"{declared.where if declared else name}: memory = \"auto\" needs the device's "
                f"total, and no probe sees {name}; give a size (\"16GiB\")")
        headroom = (declared.headroom_bytes if declared and declared.headroom_bytes is not None
                    else (DEFAULT_GPU_HEADROOM if memory == "auto" else 0))
        total = None if reading is None else reading.total_bytes
        budget = (max(0, total - headroom) if memory == "auto" and total is not None
                  else int(memory))
        return Device(
            name=name, label="declared" if reading is None else reading.label,
            total_bytes=total, budget_bytes=budget, headroom_bytes=headroom,
            seen=reading is not None,
            used_bytes=None if reading is None else reading.used_bytes,
        )

    def _read(self) -> list[GpuReading]:
        try:
            return self.probe.read()
        except Exception as e:  # a driver hiccup must not take admission down
            log.warning("reading the GPUs failed: %s", e)
            return []

    def check_recipes(self, recipes: Iterable[Recipe]) -> None:
        """ConfigError for a recipe on a device that does not exist (a reload checks again)."""
        _check_recipes(recipes, self.devices, can_see_gpus=self.probe.source != "none")

    @property
    def gpus(self) -> list[str]:
        return [name for name in self.devices if name.startswith("cuda")]

    def refresh(self, our_pids: Iterable[int]) -> dict[int, int]:
        """Re-read the probe; return our pids' VRAM as the driver counts it."""
        ours = set(our_pids)
        per_pid: dict[int, int] = {}
        for reading in self._read():
            device = self.devices.get(reading.name)
            if device is None:
                continue
            device.total_bytes = reading.total_bytes
            device.used_bytes = reading.used_bytes
            mine = 0
            for pid, used in reading.processes.items():
                if pid in ours:
                    per_pid[pid] = per_pid.get(pid, 0) + used
                    mine += used
            release = self._releases.get(reading.name)
            pending = release.held if release is not None else 0
            # Everything used that is not a live worker of ours (nor one just leaving).
            device.used_by_others_bytes = max(0, reading.used_bytes - mine - pending)
        return per_pid

    def budgets(self) -> dict[str, int]:
        return {name: budget for name, d in self.devices.items()
                if (budget := d.effective_budget()) is not None}

    def worker_left(self, device: str, pid: int, held_bytes: int) -> None:
        """One of our workers on ``device`` ended; the next load there waits for its memory."""
        d = self.devices.get(device)
        if d is None or not d.seen:
            return  # nothing to watch: a declared device without a probe
        used = d.used_bytes if d.used_bytes is not None else 0
        self._releases[device] = _Release(pid=pid, used_before=used, held=held_bytes)

    def releasing(self, device: str) -> bool:
        return device in self._releases

    async def wait_released(self, device: str) -> float:
        """Wait until the last worker that left ``device`` is gone from it; seconds waited."""
        release = self._releases.get(device)
        if release is None:
            return 0.0
        started = time.monotonic()
        while True:
            reading = next((g for g in self._read() if g.name == device), None)
            if reading is None or (
                release.pid not in reading.processes
                and reading.used_bytes <= release.used_before - release.held + RELEASE_SLACK
            ):
                break
            waited = time.monotonic() - started
            if waited >= self.release_wait_s:
                log.warning("%s: pid %d's %d MiB did not show free within %gs; loading anyway",
                            device, release.pid, release.held // MiB, self.release_wait_s)
                break
            await asyncio.sleep(0.1)
        self._releases.pop(device, None)
        return time.monotonic() - started

    def describe(self) -> list[dict[str, Any]]:
        return [{
            "name": d.name, "label": d.label, "seen": d.seen, "total_bytes": d.total_bytes,
            "budget_bytes": d.effective_budget(), "headroom_bytes": d.headroom_bytes,
            "used_by_others_bytes": d.used_by_others_bytes, "free_bytes": d.free_bytes(),
            "releasing": self.releasing(d.name),
        } for d in self.devices.values()]


def _check_recipes(recipes: Iterable[Recipe], devices: Mapping[str, Device], *,
                   can_see_gpus: bool) -> None:
    """A recipe pinned to a device nobody knows is a config error, except a GPU on a machine
    where nothing can list GPUs (no NVML, none declared): it runs there unbudgeted, as
    before devices had budgets, and the log says how to budget it."""
    for recipe in recipes:
        device = recipe.device
        if device in ("auto", CPU, "cuda", "npu") or device in devices:
            continue
        if device.startswith("cuda") and not can_see_gpus and not any(
                d.startswith("cuda") for d in devices):
            log.warning("[models.%s] device = %r: no GPU can be listed here (install "
                        "nvidia-ml-py, or declare [devices.\"%s\"] memory = ...), so its "
                        "memory is not budgeted per device", recipe.name, device, device)
            continue
        known = ", ".join(["cpu", *devices]) or "cpu"
        raise ConfigError(
            f"{recipe.source}: [models.{recipe.name}] device: {device!r} does not exist on this "
            f"machine (devices: {known}); declare it with a [devices.\"{device}\"] table or "
            f"use \"auto\"")
