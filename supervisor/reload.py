"""Config reload without a restart: apply the difference between the running and the new config.

``SIGHUP``, ``lemonade reload`` and ``POST /api/v1/reload`` re-read the config files with the
same flags and environment the server started with (``load_settings`` again), so an invalid
file raises ``ConfigError`` naming file and key before anything has changed. Then, with no
``await`` between the checks and the swap:

* **new models** get a slot and can be used at once;
* **removed models** are marked removed (new requests get 404) and retired through the one
  retire path with reason ``removed``: requests in flight drain and finish; the slot is
  dropped once its process is gone (a model still busy after ``drain_timeout`` is retired
  when it next becomes idle);
* **changed recipes** take effect at the model's next load: an unloaded model switches now; a
  loaded one is retired with reason ``reload`` as soon as it is idle (now, or when its
  requests finish), and its next request loads the new recipe. Its measured footprint is
  forgotten (the new recipe may cost something else);
* **server settings** that the running server reads where it needs them (timeouts, caps, the
  memory budget, the default model, groups) apply at once; the ones bound at start (listen
  address, data dir, zygotes, devices, log settings, load parallelism, heartbeats) keep their
  running values and are reported as needing a restart.

Requests in flight never see the swap: they hold their lease on the worker they started with.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any

from supervisor.config import Recipe, Settings
from supervisor.lifecycle import IdleTimer, Slot, State
from supervisor.placement import resolve_budget

if TYPE_CHECKING:
    from supervisor.manager import Manager

log = logging.getLogger(__name__)

#: Settings fields bound when the server starts; a reload reports a change and keeps them.
RESTART_FIELDS = (
    "host", "port", "data_dir", "zygotes", "zygote_idle_timeout_s", "api_key", "log_level",
    "access_log", "devices", "max_parallel_loads", "heartbeat_interval_s",
    "heartbeat_timeout_s",
)
#: Fields that say where values came from rather than what they are.
_BOOKKEEPING = ("models", "sources", "config_path", "preload")


def _changed_fields(old: Settings, new: Settings) -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)
            if f.name not in _BOOKKEEPING and getattr(old, f.name) != getattr(new, f.name)]


def _same_recipe(a: Recipe, b: Recipe) -> bool:
    # ``source`` only says which file it came from; moving a table is not a change.
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


def apply(manager: Manager, new: Settings) -> dict[str, Any]:
    """Apply ``new`` to the running manager; returns what changed. Synchronous: one step."""
    old = manager.settings
    manager.inventory.check_recipes(new.models.values())  # a recipe on a missing device
    changed = _changed_fields(old, new)
    restart = [name for name in changed if name in RESTART_FIELDS]
    applied = [name for name in changed if name not in RESTART_FIELDS]
    kept = {name: getattr(old, name) for name in RESTART_FIELDS}
    manager.settings = dataclasses.replace(new, **kept)
    if "memory_budget" in applied:
        budget = resolve_budget(new.memory_budget)
        manager.admission.memory_budget_bytes = manager.memory_budget_bytes = budget
    manager.inventory.release_wait_s = new.vram_release_wait_s

    added = [name for name in new.models if name not in manager.slots]
    removed = [name for name, slot in manager.slots.items()
               if name not in new.models and not slot.removed]
    recipes_changed = [name for name in new.models if name in manager.slots
                       and not _same_recipe(manager.slots[name].recipe, new.models[name])]
    for name in added:
        manager.slots[name] = Slot(
            recipe=new.models[name],
            timer=IdleTimer(functools.partial(manager.idle_expired, name)))
    reloading = []
    for name in recipes_changed:
        slot = manager.slots[name]
        if slot.state in (State.UNLOADED, State.FAILED):
            switch_recipe(slot, new.models[name])
        else:
            slot.pending_recipe = new.models[name]
            reloading.append(name)
    for name in removed:
        slot = manager.slots[name]
        slot.removed = True
        if slot.state in (State.UNLOADED, State.FAILED):
            slot.timer.cancel()
            del manager.slots[name]
    # Models whose effective idle timeout may have changed, and those due a reload or a
    # removal: the idle hook re-arms, retires or drops each one that nobody holds.
    for slot in list(manager.slots.values()):
        manager.became_idle(slot)
    report = {
        "config": new.config_path,
        "added": added, "removed": removed,
        "changed": [n for n in recipes_changed if n not in reloading],
        "reload_when_idle": reloading,
        "server_settings_applied": applied,
        "restart_needed": restart,
    }
    log.info("config reloaded: %s", ", ".join(
        f"{key} {value}" for key, value in report.items() if value and key != "config")
        or "no changes")
    return report


def switch_recipe(slot: Slot, recipe: Recipe) -> None:
    """The slot's next load uses ``recipe``; what was measured for the old one is forgotten."""
    slot.recipe = recipe
    slot.pending_recipe = None
    slot.measured_cost_bytes = slot.measured_ram_bytes = slot.measured_device_bytes = None
    slot.measured_device = None
    slot.failures = 0
    slot.cooldown_until_mono = 0.0
    slot.last_error = None
