"""The ``kokoro-onnx`` kind in a real worker process, driven through a real Manager.

The slow test loads Kokoro-82M (int8 ONNX) once, assembled from the model packages into this
test's data dir, and checks what a speech client relies on: every format decodes at 24 kHz,
a streamed answer arrives in pieces with the first one well before the end, voices and blends
are checked against the model's voices, and bad input is ``invalid_request`` naming the field
while the same process keeps serving. The assembled model file is checked in process: built
once, reused, rebuilt when damaged.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from supervisor.errors import BadRequest, LemonadeError
from supervisor.manager import Manager
from tests.integration.conftest import ManagerFactory
from workers.kokoro_onnx_assets import MODEL_FILE, assembled_model, expected_sha256

CONFIG = """
[server]
auto_unload_timer = "never"
stop_grace = "2s"
[models.kokoro]
recipe = "kokoro-onnx"
device = "cpu"
[models.kokoro.options]
threads = 2
"""

THREE_SENTENCES = "The first sentence. The second one. And the third."


async def speak(manager: Manager, text: str, **args: Any) -> tuple[list[tuple[float, bytes]],
                                                                   Any, float]:
    """(chunks with their arrival times, the call result, when the call was sent)."""
    started = time.monotonic()
    async with manager.use("kokoro") as lease, lease.channel.call(
        "speech", {"input": text, **args}, timeout_s=120
    ) as call:
        chunks = [(time.monotonic(), c) async for c in call]
        return chunks, call.result, started


def decode(data: bytes) -> tuple[np.ndarray[Any, Any], int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


@pytest.mark.slow
async def test_kokoro_onnx_speaks_streams_and_checks_its_input(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    manager = await make_manager(CONFIG)
    async with manager.use("kokoro") as lease, lease.channel.call("voices", {},
                                                                  timeout_s=30) as call:
        assert await call.collect() == []
        listing = call.result
        pid = lease.pid
    info = manager.slots["kokoro"].info
    assert info["g2p"] == "hibari" and info["model"].endswith(MODEL_FILE)
    assert info["assembled_now"] is True
    assert (tmp_path / ".lemonade" / "kokoro-onnx" / MODEL_FILE).is_file()
    assert "jf_alpha" in listing["voices"] and listing["default"] == "jf_alpha"
    assert listing["voices"] == sorted(listing["voices"])

    for fmt in ("wav", "flac", "opus"):
        chunks, result, _ = await speak(manager, "Hello there.", response_format=fmt)
        assert len(chunks) == 1
        samples, rate = decode(chunks[0][1])
        assert rate == 24000 and result["sample_rate"] == 24000
        assert abs(len(samples) / rate - result["seconds"]) < 0.1  # opus pads a little
        assert 0.4 < result["seconds"] < 3.0 and np.abs(samples).max() > 0.05

    chunks, result, started = await speak(manager, THREE_SENTENCES, response_format="wav",
                                          stream=True, voice="jf_alpha(2)+jm_kumo")
    assert result["chunks"] == 3 and len(chunks) == 3, result
    first, last = chunks[0][0] - started, chunks[-1][0] - started
    assert first < 0.7 * last, (first, last)
    streamed = b"".join(c for _, c in chunks)
    assert streamed[:4] == b"RIFF"  # the streaming header: sizes unknown, samples follow
    assert abs((len(streamed) - 44) / 2 / 24000 - result["seconds"]) < 0.01

    for args, needle in [
        ({"voice": "af_heart"}, "voice 'af_heart' is not one of this model's voices: jf_alpha"),
        ({"input": "  "}, "input must be a non-empty string"),
        ({"input": "\u200b"}, "input has nothing to speak"),
        ({"input": "x" * 4097}, "limit is 4096"),
        ({"speed": 5}, "speed must be a number between 0.25 and 4"),
        ({"response_format": "aac"}, "response_format must be one of"),
        ({"stream": "yes"}, "stream must be true or false"),
    ]:
        with pytest.raises(BadRequest) as caught:
            await speak(manager, str(args.pop("input", "Hi.")), **args)
        assert needle in caught.value.message, caught.value.message
    assert manager.slots["kokoro"].pid == pid



def test_the_model_is_assembled_once_and_rebuilt_when_damaged(tmp_path: Path) -> None:
    built, fresh = assembled_model(tmp_path)
    assert fresh and built == tmp_path / MODEL_FILE
    assert hashlib.sha256(built.read_bytes()).hexdigest() == expected_sha256()
    stamp = built.stat().st_mtime_ns
    assert assembled_model(tmp_path) == (built, False)  # cached: not rebuilt
    assert built.stat().st_mtime_ns == stamp
    with built.open("r+b") as f:  # a truncated file (a crash mid-copy by another tool)
        f.truncate(1000)
    assert assembled_model(tmp_path) == (built, True)
    assert hashlib.sha256(built.read_bytes()).hexdigest() == expected_sha256()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, MODEL_FILE + ".sha256"]


async def test_a_missing_voices_file_fails_the_load_naming_the_option(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "voices-v1.0.bin"
    manager = await make_manager(CONFIG + f'voices = "{missing}"\n')
    with pytest.raises(LemonadeError) as caught:
        await speak(manager, "Hi.")
    assert "option 'voices'" in caught.value.message and str(missing) in caught.value.message
