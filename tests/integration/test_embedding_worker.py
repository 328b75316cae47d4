"""The embedding kind in a real worker process, driven through the Manager: batching that keeps
input order, the worker's own checks of its arguments, recipe mistakes that fail the load."""

from __future__ import annotations

import array
import math

import pytest

from supervisor.errors import BadRequest, ServiceUnavailable
from supervisor.manager import Manager
from tests.integration.conftest import ManagerFactory

pytestmark = pytest.mark.timeout(300)

CONFIG = """
[server]
auto_unload_timer = "never"
stop_grace = "2s"
[models.minilm]
recipe = "embedding"
type = "embedding"
warmup = true
[models.minilm.options]
batch_size = 3
[models.broken]
recipe = "embedding"
type = "embedding"
[models.broken.options]
model = "/nonexistent/folder"
"""


async def embed(manager: Manager, args: dict) -> tuple[list[list[float]], dict]:
    async with manager.use("minilm") as lease:
        async with lease.channel.call("embed", args, timeout_s=60) as call:
            chunks = await call.collect()
            result = call.result
    vectors: list[list[float]] = []
    for chunk in chunks:
        assert chunk["index"] == len(vectors)  # chunks arrive in input order
        for raw in chunk["vectors"]:
            values = array.array("f")
            values.frombytes(raw)
            vectors.append(values.tolist())
    return vectors, result


async def test_batches_keep_input_order_and_bad_arguments_are_400(
        make_manager: ManagerFactory) -> None:
    manager = await make_manager(CONFIG)
    texts = ["short", "a much longer sentence than the others in this batch", "mid length one",
             "x", "another fairly long sentence about nothing much", "tiny", "medium text"]
    vectors, result = await embed(manager, {"input": texts})
    assert len(vectors) == len(texts) and result["count"] == len(texts)
    assert result["dimensions"] == 384 and result["prompt_tokens"] > 2 * len(texts)
    for i in (0, 1, 6):
        alone, _ = await embed(manager, {"input": [texts[i]]})
        dot = sum(a * b for a, b in zip(alone[0], vectors[i], strict=True))
        assert math.isclose(dot, 1.0, abs_tol=1e-4), i
    slot = manager.slots["minilm"]
    assert slot.info["warmup_seconds"] is not None  # the warmup ran the encoder once
    assert slot.info["weights_loader"] == "direct", "the bundled folder skips from_pretrained"
    for args, words in [
        ({"input": [1, 2]}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input[1]"),
        ({"input": ["ok"], "dimensions": 12}, "dimensions"),
    ]:
        with pytest.raises(BadRequest, match=words.replace("[", r"\[")):
            await embed(manager, args)
    assert slot.pid is not None and slot.restarts == 0  # bad input never costs the worker


async def test_a_missing_model_folder_fails_the_load_without_retry(
        make_manager: ManagerFactory) -> None:
    manager = await make_manager(CONFIG)
    with pytest.raises(ServiceUnavailable, match="does not exist"):
        async with manager.use("broken"):
            pass
