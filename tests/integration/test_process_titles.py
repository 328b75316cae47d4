"""Worker and zygote processes say what they are in ``ps``/``top`` (workers/proctitle.py).

Real processes throughout: a real Manager starts synthetic workers by a fresh spawn
(``python -m workers``) and by a fork from a real zygote, and psutil reads what ``ps`` and
``top`` read: the command line (``/proc/PID/cmdline``) and the 15-byte name (``comm``).
"""

from __future__ import annotations

import psutil

from tests.integration.conftest import ManagerFactory
from tests.integration.test_manager import server, speak, tts


def title(pid: int) -> str:
    # setproctitle pads the old command line's space with NULs, which psutil reads as empty
    # arguments (ps shows them as trailing blanks).
    return " ".join(part for part in psutil.Process(pid).cmdline() if part)


async def test_a_spawned_worker_is_named_after_its_model(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(zygotes="off") + tts("tone-spawned-by-hand"))
    pid, _ = await speak(manager, "tone-spawned-by-hand")
    assert manager.slots["tone-spawned-by-hand"].info["worker_start"] == "spawn"
    assert title(pid) == "lemonade worker tone-spawned-by-hand"
    assert psutil.Process(pid).name() == "lw:tone-spawned"  # comm keeps 15 bytes


async def test_a_forked_worker_and_its_zygote_are_named(make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(zygotes="lazy") + tts("tone") + tts("hum"))
    tone, _ = await speak(manager, "tone")
    hum, _ = await speak(manager, "hum")
    assert manager.slots["tone"].info["worker_start"] == "fork"
    (zygote,) = manager.zygotes.describe()
    assert psutil.Process(tone).ppid() == zygote["pid"] == psutil.Process(hum).ppid()
    # Two children of one template, each with its own model's name, not the zygote's.
    assert title(tone) == "lemonade worker tone" and psutil.Process(tone).name() == "lw:tone"
    assert title(hum) == "lemonade worker hum" and psutil.Process(hum).name() == "lw:hum"
    assert title(zygote["pid"]) == "lemonade zygote synthetic"
    assert psutil.Process(zygote["pid"]).name() == "lz:synthetic"
