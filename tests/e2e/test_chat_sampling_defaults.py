"""Sampling defaults per recipe, end to end: a real server with the real SmolLM2-135M twice,
once with no sampling options (``plain``) and once with ``temperature = 0`` in its recipe
(``greedy``), called with the ``openai`` client.

Seeded sampling is deterministic (each call has its own generator), so every comparison
below is exact: a request that sets no temperature gets the recipe's greedy answer whatever
its seed, and a request that sets one gets what the plain model gives for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Server, module_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.plain]
recipe = "llm"
type = "llm"
max_concurrency = 1
[models.greedy]
recipe = "llm"
type = "llm"
max_concurrency = 1
[models.greedy.options]
temperature = 0.0
"""
LOAD_TIMEOUT_S = 600.0
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, CONFIG, "sampling", load=("plain", "greedy"),
                             load_timeout_s=LOAD_TIMEOUT_S, shared_data=True)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    # Per test: a client's pooled connections must not outlive the test (the leak guard).
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                       timeout=120) as client:
        yield client


def answer(client: openai.OpenAI, model: str, **fields: Any) -> str:
    reply = client.chat.completions.create(model=model, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=10, **fields)
    return reply.choices[0].message.content or ""


def test_the_recipe_default_applies_and_a_request_value_wins(client: openai.OpenAI) -> None:
    greedy = answer(client, "plain", temperature=0)
    assert greedy.strip()
    # No temperature in the request: the recipe's 0, so the seed changes nothing.
    assert answer(client, "greedy", seed=1) == answer(client, "greedy", seed=2) == greedy

    # The request's temperature wins: the greedy recipe samples exactly as the plain one does.
    sampled = {seed: answer(client, "plain", temperature=1.5, seed=seed) for seed in (1, 2, 3)}
    for seed, text in sampled.items():
        assert answer(client, "greedy", temperature=1.5, seed=seed) == text
    assert any(text != greedy for text in sampled.values()), sampled

    # Neither sets one: OpenAI's temperature 1.
    assert answer(client, "plain", seed=4) == answer(client, "plain", temperature=1.0, seed=4)
    # The extra knobs go through too: a top_k of 1 is greedy at any temperature.
    assert answer(client, "plain", temperature=1.5, seed=5,
                  extra_body={"top_k": 1}) == greedy


@pytest.mark.parametrize(("fields", "needle"), [
    ({"top_k": -1}, "'top_k' must be between 0 and 1000000"),
    ({"top_k": "many"}, "'top_k' must be an integer"),
    ({"repetition_penalty": 0.5}, "'repetition_penalty' must be between 1 and 2"),
    ({"repetition_penalty": 3}, "'repetition_penalty' must be between 1 and 2"),
    ({"temperature": 2.5}, "'temperature' must be between 0 and 2"),
])
def test_a_bad_sampling_field_is_a_400_naming_it(client: openai.OpenAI, fields: dict[str, Any],
                                                 needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        answer(client, "greedy", extra_body=fields)
    assert needle in caught.value.message
