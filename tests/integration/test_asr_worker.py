"""The ``asr`` kind in a real worker process, driven through a real Manager.

One load serves every check in the slow test (a load costs seconds): real speech comes back
as the spoken words, and files a user might send by mistake (garbage, a text file, silence
that decodes to nothing, a file past the duration limit, a language the English-only model
cannot do) each get an ``invalid_request`` that names the problem, while the same worker
process keeps serving. Recipe mistakes fail the load as ``bad_config`` naming the option.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from supervisor.errors import BadRequest, LemonadeError
from supervisor.manager import Manager
from tests.integration.conftest import ManagerFactory

SPEECH = Path(__file__).resolve().parent.parent / "data" / "quick_brown_fox.flac"
SPOKEN = "the quick brown fox jumps over the lazy dog"

CONFIG = """
[server]
auto_unload_timer = "never"
stop_grace = "2s"
[models.whisper]
recipe = "asr"
device = "cpu"
[models.whisper.options]
threads = 2
beam_size = 1
max_audio_seconds = 30
"""


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_overlap(heard: str, spoken: str) -> float:
    """Share of the spoken words that were heard (order-insensitive, case-insensitive)."""
    said = words(spoken)
    got = set(words(heard))
    return sum(w in got for w in said) / len(said)


async def transcribe(manager: Manager, audio: bytes, **args: Any) -> tuple[list[Any], Any]:
    async with manager.use("whisper") as lease, lease.channel.call(
        "transcribe", {"audio": audio, "filename": "upload.bin", **args}, timeout_s=60
    ) as call:
        chunks = await call.collect()
        return chunks, call.result


def wav_bytes(samples: np.ndarray[Any, Any], rate: int) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.mark.slow
async def test_whisper_transcribes_speech_and_refuses_bad_files(
    make_manager: ManagerFactory,
) -> None:
    manager = await make_manager(CONFIG)
    chunks, result = await transcribe(manager, SPEECH.read_bytes())
    pid = manager.slots["whisper"].pid
    text = "".join(c["segment"]["text"] for c in chunks)
    assert word_overlap(text, SPOKEN) >= 0.8, text
    assert result["language"] == "en" and 2.0 < result["duration"] < 6.0, result
    first = chunks[0]["segment"]
    assert first["id"] == 0 and 0 <= first["start"] < first["end"] <= result["duration"] + 0.5

    info = manager.slots["whisper"].info
    assert info["multilingual"] is False and info["model"].endswith("model"), info

    problems: list[tuple[bytes, dict[str, Any], str]] = [
        (b"this is not audio at all" * 50, {}, "could not be decoded"),
        (b"", {}, "is empty"),
        (wav_bytes(np.zeros(0, np.float32), 16000), {}, "no audio"),
        (wav_bytes(np.zeros(16000 * 31, np.float32), 16000), {}, "longer than"),
        (SPEECH.read_bytes(), {"language": "de"}, "English-only"),
        (SPEECH.read_bytes(), {"language": "english"}, "ISO-639-1"),
        (SPEECH.read_bytes(), {"temperature": 3}, "temperature"),
    ]
    for audio, args, expected in problems:
        with pytest.raises(BadRequest) as caught:
            await transcribe(manager, audio, **args)
        assert expected in caught.value.message, (expected, caught.value.message)
        if not args:
            assert "upload.bin" in caught.value.message

    # The same process still serves, with language and a prompt this time.
    chunks, result = await transcribe(manager, SPEECH.read_bytes(), language="en",
                                      prompt="A pangram.", word_timestamps=True)
    assert manager.slots["whisper"].pid == pid
    assert any(c["segment"].get("words") for c in chunks)
    assert word_overlap("".join(c["segment"]["text"] for c in chunks), SPOKEN) >= 0.8


async def test_a_missing_model_directory_fails_the_load_naming_the_option(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-whisper"
    manager = await make_manager(CONFIG.replace(
        "threads = 2", f'threads = 2\nmodel = "{missing}"'))
    with pytest.raises(LemonadeError) as caught:
        await transcribe(manager, SPEECH.read_bytes())
    assert "option 'model'" in caught.value.message and str(missing) in caught.value.message
