"""Every shipped kind still forks safely with what its zygote now prepares and learns.

A zygote imports its kind's modules, builds weight-independent state (the English G2P for
the two Kokoro kinds) and imports the modules its workers' loads were seen to import. None of
that may start a thread or initialise CUDA, or forking the zygote would copy a process in a
state a child cannot use. The zygote checks that itself (``workers.zygote.fork_hazard``) and
reports ``unsafe`` when it fails; here each real kind, with its real default weights, must
load in a forked worker, learn, stay ``ready`` and fork the next worker too.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import shared_data_dir, wait_for
from tests.integration.conftest import ManagerFactory

KINDS: list[tuple[str, str, dict[str, Any]]] = [
    ("synthetic", "tts", {}),
    ("kokoro-onnx", "tts", {}),
    ("hibari", "tts", {}),
    ("kokoro", "tts", {"weights": "random"}),
    ("llm", "llm", {}),
    ("embedding", "embedding", {}),
    ("asr", "asr", {}),
]


def _config(data_dir: Any, kind: str, model_type: str, options: dict[str, Any]) -> str:
    lines = ["[server]", 'auto_unload_timer = "never"', 'stop_grace = "5s"',
             'zygotes = "lazy"', 'load_timeout = "10m"', f'data_dir = "{data_dir}"',
             "[models.m]", f'recipe = "{kind}"', f'type = "{model_type}"', "warmup = true",
             "max_concurrency = 1", "[models.m.options]"]
    lines += [f'{k} = "{v}"' for k, v in options.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("kind", "model_type", "options"), KINDS, ids=[k[0] for k in KINDS])
async def test_a_zygote_stays_safe_to_fork_with_its_preparation_and_what_it_learned(
    make_manager: ManagerFactory, tmp_path_factory: pytest.TempPathFactory,
    kind: str, model_type: str, options: dict[str, Any],
) -> None:
    manager = await make_manager(_config(shared_data_dir(tmp_path_factory), kind,
                                         model_type, options))
    await manager.load("m")
    assert manager.slots["m"].info["worker_start"] == "fork", (
        f"the {kind} zygote did not fork its first worker: {manager.zygotes.describe()}")

    def zygote() -> dict[str, Any]:
        (row,) = manager.zygotes.describe()
        return row

    await wait_for(lambda: not zygote()["learning"], 300, f"the {kind} zygote to learn")
    after = zygote()
    assert after["state"] == "ready" and after["unsafe_reason"] is None, after
    await manager.unload("m")
    await manager.load("m")
    assert manager.slots["m"].info["worker_start"] == "fork"
    assert zygote()["pid"] == after["pid"], "the same zygote forked the second worker"
