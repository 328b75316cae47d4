"""A zygote learns what its workers' loads import lazily, and stays safe to fork.

Real processes: a real Manager, real zygotes and forked ``synthetic`` workers whose load
imports a module lazily (the ``lazy_import`` option), as ``transformers`` imports a model's
code inside ``from_pretrained``. What a user relies on: the second worker of a kind starts
with that module imported (no first-load import cost), a new zygote starts with what earlier
loads taught (the manifest in the data dir), and a learned module that would make forking
unsafe (it starts a thread) is caught, set aside, and never costs more than one restart.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import wait_for
from tests.integration.conftest import ManagerFactory
from tests.integration.test_manager import server, tts

PLAIN = "workers.synthetic_imports.plain"


def _zygote(manager) -> dict:
    (row,) = manager.zygotes.describe()
    return row


async def _load_info(manager, name: str) -> dict:
    await manager.load(name)
    slot = manager.slots[name]
    assert slot.info["worker_start"] == "fork"
    return dict(slot.info)


async def test_the_next_worker_starts_with_what_the_last_load_imported(
    make_manager: ManagerFactory, tmp_path: Path,
) -> None:
    manager = await make_manager(server(zygotes="lazy")
                                 + tts("a", options={"lazy_import": "plain"}))
    first = await _load_info(manager, "a")
    assert first["lazy_import_preloaded"] is False, "nothing learned yet"
    await wait_for(lambda: _zygote(manager)["learned_modules"] >= 1, 60,
                   "the zygote to import what the load used")
    manifest = json.loads((tmp_path / ".lemonade" / "synthetic" / "zygote-imports.json")
                          .read_text())
    assert PLAIN in manifest["modules"]
    zygote_pid = _zygote(manager)["pid"]
    await manager.unload("a")
    second = await _load_info(manager, "a")
    assert second["lazy_import_preloaded"] is True, "forked with the module already imported"
    assert _zygote(manager)["pid"] == zygote_pid and _zygote(manager)["state"] == "ready"


async def test_a_new_zygote_starts_with_what_earlier_loads_taught(
    make_manager: ManagerFactory,
) -> None:
    config = server(zygotes="lazy") + tts("a", options={"lazy_import": "plain"})
    manager = await make_manager(config)
    await manager.load("a")
    await wait_for(lambda: _zygote(manager)["learned_modules"] >= 1, 60, "learning")
    await manager.close()

    again = await make_manager(config)  # same data dir: the manifest is there
    info = await _load_info(again, "a")
    assert info["lazy_import_preloaded"] is True
    assert _zygote(again)["learned_modules"] >= 1 and _zygote(again)["unsafe_reason"] is None


async def test_a_learned_import_that_starts_a_thread_is_set_aside(
    make_manager: ManagerFactory, tmp_path: Path,
) -> None:
    manager = await make_manager(server(zygotes="lazy")
                                 + tts("t", options={"lazy_import": "starts_thread"}))
    await _load_info(manager, "t")
    await wait_for(lambda: _zygote(manager)["state"] == "unsafe", 60,
                   "the zygote's check to catch the thread its learned import started")
    tainted = _zygote(manager)
    assert "thread" in tainted["unsafe_reason"] and "set aside" in tainted["unsafe_reason"]
    folder = tmp_path / ".lemonade" / "synthetic"
    assert not (folder / "zygote-imports.json").exists()
    rejected = json.loads((folder / "zygote-imports.rejected.json").read_text())
    assert "workers.synthetic_imports.starts_thread" in rejected["modules"]

    await manager.unload("t")
    for _ in range(2):  # a clean zygote forks again, and learns that module no more
        info = await _load_info(manager, "t")
        assert info["lazy_import_preloaded"] is False
        clean = _zygote(manager)
        assert clean["pid"] != tainted["pid"] and clean["state"] == "ready"
        await manager.unload("t")
    assert not (folder / "zygote-imports.json").exists()
