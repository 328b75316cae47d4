"""The shipped ``lemonade.toml``, as a user gets it after ``./setup.sh``.

It must parse, declare one model of each type, and on a real server answer all four OpenAI
endpoints with the real shipped weights and no network: the default English voice speaks a
sentence and whisper hears at least 90% of its words back, embed, chat. With
``max_loaded_models = 3``, using the fourth model evicts the least recently used one, which
``/api/v1/status`` then shows with its eviction reason.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import openai
import pytest
import soundfile as sf

from supervisor.config import known_kinds, load_settings
from tests.e2e.conftest import launch_server, pid_gone
from tests.helpers import shared_data_dir

SHIPPED = Path(__file__).resolve().parents[2] / "lemonade.toml"
SENTENCE = "The quick brown fox jumps over the lazy dog."


def test_shipped_config_declares_every_model_type() -> None:
    settings = load_settings(cli={"config": str(SHIPPED)}, env={})
    by_type = {recipe.type for recipe in settings.models.values()}
    assert by_type >= {"tts", "llm", "embedding", "asr"}
    assert all(recipe.kind in known_kinds() for recipe in settings.models.values())
    assert settings.default_model in settings.models
    # A newcomer's first audio is a real English voice.
    assert settings.models[settings.default_model].kind == "hibari"
    assert settings.host == "127.0.0.1"
    assert settings.max_loaded_models is not None and settings.max_loaded_models < len(
        [r for r in settings.models.values() if r.kind != "synthetic"])
    # The timeouts differ per model: recipes override the global timer.
    assert len({r.idle_timeout_s for r in settings.models.values()}) > 1


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_four_endpoints_on_the_shipped_config_then_lru_eviction(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"LEMONADE_DATA_DIR": str(shared_data_dir(tmp_path_factory))}
    server = launch_server(SHIPPED.read_text(), tmp_path, env=env)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                           timeout=600) as client:
            audio = client.audio.speech.create(
                model="hibari", voice="heart", input=SENTENCE, response_format="wav"
            ).read()
            samples, rate = sf.read(io.BytesIO(audio))
            assert rate == 24000 and len(samples) / rate > 1.0

            heard = client.audio.transcriptions.create(
                model="whisper", file=("fox.wav", audio, "audio/wav"))
            said = words(SENTENCE)
            assert len(words(heard.text) & said) >= 0.9 * len(said), heard.text

            vectors = client.embeddings.create(model="minilm", input=[
                "How do I bake bread at home?",
                "What is a simple recipe for homemade bread?",
                "The stock market fell sharply on Tuesday.",
            ]).data
            query, paraphrase, unrelated = (v.embedding for v in vectors)
            assert cosine(query, paraphrase) > cosine(query, unrelated) + 0.2

            speech_pid = server.model("hibari")["pid"]
            resident = {r["name"] for r in server.status()["models"] if r["state"] == "ready"}
            assert resident == {"hibari", "whisper", "minilm"}

            answer = client.chat.completions.create(
                model="smollm2", max_tokens=16,
                messages=[{"role": "user", "content": "Say hello."}])
            assert answer.choices[0].message.content

        rows = {r["name"]: r for r in server.status()["models"]}
        assert rows["smollm2"]["state"] == "ready"
        # The cap is 3: the least recently used model (speech, used first) made room.
        assert rows["hibari"]["state"] == "unloaded"
        assert rows["hibari"]["last_eviction"]["reason"] == "lru"
        assert pid_gone(speech_pid)
        assert rows["whisper"]["state"] == rows["minilm"]["state"] == "ready"
        for name in ("smollm2", "whisper", "minilm"):
            assert rows[name]["memory"]["rss_bytes"] > 50 * 2**20, rows[name]
    finally:
        problems = server.stop()
    assert not problems, problems
