"""Per-device memory budgets as the user writes them: ``[devices."cuda:0"]``, an env var, a flag.

The CPU's budget stays ``[server] memory_budget`` (RAM); every other device, a GPU ``cuda:N``
or an accelerator NVML cannot see (``npu``, ``npu:N``), gets its own table::

    [devices."cuda:0"]
    memory = "16GiB"      # or "auto": what NVML reports as the total, less the headroom
    headroom = "512MiB"   # kept free for the driver and for programs that are not ours

The common case has a short form, ``LEMONADE_DEVICE_BUDGETS="cuda:0=16GiB,cuda:1=auto"`` or
``--device-budget cuda:0=16GiB`` (repeatable); a device named there replaces the file's
``memory`` for that device and keeps its ``headroom``. Parsing lives here so that
``config.py`` only routes the layers; whether a named device exists is decided when the server
starts and can ask NVML (:mod:`supervisor.devices`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from supervisor.config_values import ConfigError, fail
from supervisor.units import parse_size

#: A device a budget may be declared for: a GPU ``cuda:N`` or an NPU (``npu``, ``npu:N``).
DEVICE_NAME_RE = re.compile(r"^(npu(:\d+)?|cuda:\d+)$")
DEVICE_KEYS = ("memory", "headroom")
_EXPECTED_NAME = 'a device name: "cuda:N" (an NVIDIA GPU) or "npu"/"npu:N"'
_EXPECTED_MEMORY = '"auto" (the device total less the headroom) or a size ("16GiB")'


@dataclass(frozen=True)
class DeviceBudget:
    """One device's declared budget, and where it was declared (for error messages)."""

    name: str
    memory: int | Literal["auto"] = "auto"
    #: Bytes kept free on top of our models; None = the default (see ``devices.py``).
    headroom_bytes: int | None = None
    where: str = ""


def check_device_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not DEVICE_NAME_RE.match(name):
        if name == "cpu":
            raise ConfigError(f"{where}: the cpu's budget is [server] memory_budget "
                              f"(--memory-budget, LEMONADE_MEMORY_BUDGET), not a device table")
        fail(where, _EXPECTED_NAME, name)
    return str(name)


def parse_memory(value: Any, where: str) -> int | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = parse_size(value, where=where)
    except ValueError:
        fail(where, _EXPECTED_MEMORY, value)
    if size == 0:
        fail(where, f"{_EXPECTED_MEMORY}; a budget of 0 bytes fits nothing", value)
    return size


def parse_device_table(name: str, raw: Any, path: str) -> DeviceBudget:
    at = f'{path}: [devices."{name}"]'
    check_device_name(name, at)
    if not isinstance(raw, dict):
        fail(at, "a table with memory and/or headroom", raw)
    for key in raw:
        if key not in DEVICE_KEYS:
            raise ConfigError(f"{at}: unknown key {key!r}; allowed keys: {', '.join(DEVICE_KEYS)}")
    memory = parse_memory(raw["memory"], f"{at} memory") if "memory" in raw else "auto"
    headroom = None
    if "headroom" in raw:
        try:
            headroom = parse_size(raw["headroom"], where=f"{at} headroom")
        except ValueError:
            fail(f"{at} headroom", 'a size ("512MiB")', raw["headroom"])
    return DeviceBudget(name=name, memory=memory, headroom_bytes=headroom, where=at)


def parse_budget_list(value: Any, where: str) -> dict[str, DeviceBudget]:
    """``"cuda:0=16GiB,cuda:1=auto"`` (env) or a list of ``"cuda:0=16GiB"`` items (flags)."""
    items: Iterable[Any]
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        fail(where, '"DEVICE=SIZE" items, e.g. "cuda:0=16GiB,cuda:1=auto"', value)
    out: dict[str, DeviceBudget] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            fail(where, 'DEVICE=SIZE, e.g. "cuda:0=16GiB"', item)
        name, _, size = (part.strip() for part in item.partition("="))
        check_device_name(name, f"{where} ({item.strip()})")
        if name in out:
            raise ConfigError(f"{where}: device {name!r} is named twice")
        out[name] = DeviceBudget(name=name, memory=parse_memory(size, f"{where} ({name})"),
                                 where=where)
    return out


def merge(base: Mapping[str, DeviceBudget],
          over: Mapping[str, DeviceBudget]) -> dict[str, DeviceBudget]:
    """A later layer's ``memory`` wins per device; the file's headroom is kept."""
    out = dict(base)
    for name, budget in over.items():
        earlier = out.get(name)
        out[name] = budget if earlier is None else replace(
            earlier, memory=budget.memory, where=budget.where)
    return out
