"""The ``hibari`` kind in a real worker process, driven through a real Manager.

hibari loads in about a second, so these are not slow tests: the shipped English voice speaks
every format at 24 kHz, streams a long text sentence by sentence, answers to its Kokoro name,
gives identical audio for the same text when the recipe fixes the seed, and refuses what it
cannot do with a message that says why: an unknown voice lists the known ones, a voice that
would have to be downloaded while the hub is off says how to get it, and a recipe whose
default voice is such a voice fails its load naming the option.
"""

from __future__ import annotations

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

CONFIG = """
[server]
auto_unload_timer = "never"
stop_grace = "2s"
[models.voice]
recipe = "hibari"
device = "cpu"
[models.voice.options]
"""

FOUR_SENTENCES = ("The first sentence is short. The second one is a little longer than that. "
                  "Here comes the third. And this is the last of them.")


async def speak(manager: Manager, text: str, **args: Any) -> tuple[list[tuple[float, bytes]],
                                                                   Any, float]:
    started = time.monotonic()
    async with manager.use("voice") as lease, lease.channel.call(
        "speech", {"input": text, **args}, timeout_s=120
    ) as call:
        chunks = [(time.monotonic(), c) async for c in call]
        return chunks, call.result, started


async def test_hibari_speaks_streams_and_checks_its_input(make_manager: ManagerFactory) -> None:
    manager = await make_manager(CONFIG)
    for fmt in ("wav", "flac", "mp3", "opus", "pcm"):
        chunks, result, _ = await speak(manager, "Hello there.", response_format=fmt)
        data = b"".join(c for _, c in chunks)
        if fmt == "pcm":
            samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768
            rate = 24000
        else:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert rate == 24000 and result["sample_rate"] == 24000, fmt
        assert 0.4 < result["seconds"] < 3.0 and np.abs(samples).max() > 0.05, fmt
    pid = manager.slots["voice"].pid
    info = manager.slots["voice"].info
    assert info["default_voice"] == "heart" and "heart" in info["voices"]

    chunks, result, _started = await speak(manager, FOUR_SENTENCES, response_format="pcm",
                                          stream=True)
    assert result["chunks"] == 4 and len(chunks) == 4, result
    assert sum(len(c) for _, c in chunks) == round(result["seconds"] * 24000) * 2

    # Kokoro's name for the voice it was distilled from works too.
    _, by_kokoro_name, _ = await speak(manager, "Hi.", voice="af_heart")
    assert by_kokoro_name["seconds"] > 0

    for args, needle in [
        ({"voice": "alloy"}, "voice 'alloy' is not a hibari voice; known: emma, fable"),
        ({"voice": "emma"}, "downloads are off (HF_HUB_OFFLINE=1)"),
        ({"input": "  "}, "input must be a non-empty string"),
        ({"input": "\u200b"}, "input has nothing to speak"),
        ({"speed": 0.1}, "speed must be a number between 0.25 and 4"),
    ]:
        with pytest.raises(BadRequest) as caught:
            await speak(manager, str(args.pop("input", "Hi.")), **args)
        assert needle in caught.value.message, caught.value.message
    assert manager.slots["voice"].pid == pid  # refusals never cost the worker


async def test_a_fixed_seed_gives_identical_audio(make_manager: ManagerFactory) -> None:
    manager = await make_manager(CONFIG + "seed = 7\n")
    first = b"".join(c for _, c in (await speak(manager, "Same words, same sound."))[0])
    second = b"".join(c for _, c in (await speak(manager, "Same words, same sound."))[0])
    assert first == second and len(first) > 10_000


async def test_a_long_sentence_is_cut_into_pieces_the_model_accepts(
    make_manager: ManagerFactory
) -> None:
    manager = await make_manager(CONFIG)
    sentence = ", ".join(["one small word after another"] * 40) + "."
    _, result, _ = await speak(manager, sentence, response_format="pcm")
    assert result["chunks"] > 1 and result["seconds"] > 20


@pytest.mark.parametrize(("option", "needle"), [
    ('voice = "fable"', "option 'voice': voice 'fable' is not in the hibari-tts package"),
    ('voice = "nobody"', "option 'voice': voice 'nobody' is not a hibari voice"),
])
async def test_a_bad_default_voice_fails_the_load_naming_the_option(
    make_manager: ManagerFactory, tmp_path: Path, option: str, needle: str
) -> None:
    manager = await make_manager(CONFIG + option + "\n")
    with pytest.raises(LemonadeError) as caught:
        await speak(manager, "Hi.")
    assert needle in caught.value.message, caught.value.message
