"""The llm kind: the GGUF cache (written atomically, reused), and a real worker process driven
through the Manager (second load from the cache, cancellation, the worker's own checks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import BadRequest
from supervisor.manager import Manager
from tests.helpers import shared_data_dir
from tests.integration.conftest import ManagerFactory
from workers import gguf_cache

SMALL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


# ----------------------------------------------------------------------------- the cache


def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.Q4.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return path


def test_a_crash_mid_conversion_leaves_no_cache(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, root = fake_gguf(tmp_path), tmp_path / "cache"

    def crash(gguf_path: Path, out: Path, report: Any) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_cache, "convert", crash)
    with pytest.raises(OSError, match="disk full"):
        gguf_cache.converted_folder(gguf, root)
    assert list(root.iterdir()) == [root / f".{gguf_cache.cache_key(gguf)}.lock"]

    # A hard crash (no cleanup ran) leaves a temporary folder: never used, removed next time.
    leftover = root / f".{gguf_cache.cache_key(gguf)}.tmp-dead"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    calls = []

    def good(gguf_path: Path, out: Path, report: Any) -> None:
        calls.append(out)
        (out / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(gguf_cache, "convert", good)
    folder, cached = gguf_cache.converted_folder(gguf, root)
    assert (cached, len(calls)) == (False, 1)
    assert folder == root / gguf_cache.cache_key(gguf) and gguf_cache.is_complete(folder)
    assert not leftover.exists()
    assert gguf_cache.converted_folder(gguf, root) == (folder, True)
    assert len(calls) == 1

    # A changed file (size or mtime) is a different key: converted afresh.
    gguf.write_bytes(b"GGUF" + b"\1" * 65)
    other, cached = gguf_cache.converted_folder(gguf, root)
    assert other != folder and not cached and len(calls) == 2


# ----------------------------------------------------------------------------- real worker


def config(data_dir: Path, **options: Any) -> str:
    lines = [f'[server]\nauto_unload_timer = "never"\nstop_grace = "2s"\ndata_dir = "{data_dir}"',
             '[models.smol]\nrecipe = "llm"\ntype = "llm"\nmax_concurrency = 1',
             "[models.smol.options]"]
    lines += [f"{k} = {v!r}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


async def generate(manager: Manager, op: str, args: dict[str, Any]) -> tuple[list[Any], Any]:
    async with manager.use("smol") as lease:
        async with lease.channel.call(op, args, timeout_s=300) as call:
            chunks = await call.collect()
            return chunks, call.result


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_second_load_uses_the_cache_and_hang_ups_stop_generating(
        make_manager: ManagerFactory, tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = shared_data_dir(tmp_path_factory)
    manager = await make_manager(config(data_dir, max_context=64))
    async with manager.use("smol"):  # converts the GGUF unless an earlier test did
        pass
    assert await manager.unload("smol")
    started = time.monotonic()
    async with manager.use("smol"):
        took = time.monotonic() - started
    slot = manager.slots["smol"]
    assert slot.info["cache_used"] is True, slot.info
    assert slot.info["weights_loader"] == "direct", "a converted folder skips from_pretrained"
    assert Path(slot.info["path"]).parent == data_dir / "llm"
    assert took < 60, f"a cached load took {took:.1f}s"

    # Streamed: text pieces, then the result; whole: the text in the result.
    chunks, result = await generate(manager, "chat", {"messages": SMALL, "max_tokens": 4,
                                                      "temperature": 0, "stream": True})
    assert all(isinstance(c, str) for c in chunks) and len(chunks) > 1
    _, whole = await generate(manager, "chat", {"messages": SMALL, "max_tokens": 4,
                                                "temperature": 0})
    assert whole["text"] == "".join(chunks)
    assert result["completion_tokens"] == whole["completion_tokens"] == 4

    # Leaving a streamed call early cancels it in the worker; with max_concurrency 1, the next
    # call would otherwise wait behind up to 40 more tokens.
    async with manager.use("smol") as lease:
        async with lease.channel.call("complete", {"prompt": "Once", "max_tokens": 40,
                                                   "stream": True}, timeout_s=300) as call:
            assert isinstance(await anext(call), str)
    started = time.monotonic()
    _, quick = await generate(manager, "complete", {"prompt": "Hi", "max_tokens": 1})
    assert quick["completion_tokens"] == 1
    assert time.monotonic() - started < 10

    # The worker checks what only it knows (the 64-token context) and what it is sent.
    for op, args, words in [
        ("chat", {"messages": SMALL, "max_tokens": 60}, "max_tokens"),
        ("chat", {"messages": [{"role": "user", "content": "word " * 100}]}, "too long"),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role"),
        ("complete", {"prompt": "x", "top_p": 0}, "top_p"),
        ("complete", {"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ]:
        with pytest.raises(BadRequest, match=words):
            await generate(manager, op, args)
    assert manager.slots["smol"].restarts == 0
