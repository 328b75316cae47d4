"""The llm kind's sampling knobs without a model: recipe defaults, a request's own value
winning, the ranges both are checked against, and what top_k and repetition_penalty do to
one step's logits (workers/llm.py ``Sampling``, ``knob_problem``, ``_pick``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError
from tests.helpers import settings_from_toml
from workers.base import LoadContext, LoadRequest, ModelError
from workers.llm import SAMPLING_DEFAULTS, CausalLMModel, Sampling, _pick
from workers.protocol import ErrorCode

RECIPE = {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}


def test_a_request_that_sets_nothing_takes_the_recipe_defaults() -> None:
    sampling = Sampling.from_args({}, RECIPE)
    assert (sampling.temperature, sampling.top_p, sampling.top_k,
            sampling.repetition_penalty) == (0.2, 0.9, 40, 1.1)
    # null is "not set" too (a client that serialises every field).
    assert Sampling.from_args({"temperature": None}, RECIPE).temperature == 0.2
    # Without recipe defaults: OpenAI's, and the two extra knobs off.
    plain = Sampling.from_args({})
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (
        SAMPLING_DEFAULTS["temperature"], SAMPLING_DEFAULTS["top_p"], 0, 1.0)


def test_a_request_value_wins_over_the_recipe_default() -> None:
    sampling = Sampling.from_args({"temperature": 0, "top_p": 1, "top_k": 0,
                                   "repetition_penalty": 1}, RECIPE)
    assert (sampling.temperature, sampling.top_p, sampling.top_k,
            sampling.repetition_penalty) == (0.0, 1.0, 0, 1.0)


@pytest.mark.parametrize(("args", "needle"), [
    ({"temperature": 2.5}, "'temperature' must be a number in [0, 2]"),
    ({"temperature": True}, "'temperature' must be a number"),
    ({"top_p": 0}, "'top_p' must be a number in (0, 1]"),
    ({"top_k": -1}, "'top_k' must be an integer in 0..1000000"),
    ({"top_k": 2.0}, "'top_k' must be an integer"),
    ({"repetition_penalty": 0.9}, "'repetition_penalty' must be a number in [1, 2]"),
    ({"repetition_penalty": "high"}, "'repetition_penalty' must be a number"),
])
def test_a_bad_request_value_is_an_invalid_request_naming_the_field(
        args: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelError) as caught:
        Sampling.from_args(args, RECIPE)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert needle in caught.value.message


@pytest.mark.parametrize(("options", "needle"), [
    ({"temperature": 3}, "'temperature' must be"),
    ({"temperature": "low"}, "'temperature' must be"),
    ({"top_p": 0}, "'top_p' must be a number in (0, 1]"),  # the spec allows 0; load does not
    ({"top_p": 1.5}, "'top_p' must be"),
    ({"top_k": 1.5}, "'top_k' must be an integer"),
    ({"repetition_penalty": 0.5}, "'repetition_penalty' must be"),
])
def test_a_bad_recipe_default_is_bad_config_before_any_weights(
        options: dict[str, Any], needle: str) -> None:
    model = CausalLMModel()
    request = LoadRequest(name="smol", type="llm", device="cpu", options=options)
    with pytest.raises(ModelError) as caught:
        model.load(request, LoadContext(lambda *_: None))
    assert caught.value.code == ErrorCode.BAD_CONFIG
    assert needle in caught.value.message and "llm option" in caught.value.message


@pytest.mark.parametrize(("line", "needle"), [
    ("temperature = 3.0", "'temperature' must be a number in 0..2, got 3.0"),
    ('top_k = "40"', "'top_k' must be an integer in 0..1000000"),
    ("repetition_penalty = 0.5", "'repetition_penalty' must be a number in 1..2"),
    ("temprature = 0.2", "did you mean 'temperature'?"),
])
def test_the_config_refuses_a_bad_sampling_default_naming_model_and_key(
        tmp_path: Path, line: str, needle: str) -> None:
    text = f'[models.smol]\nrecipe = "llm"\ntype = "llm"\n[models.smol.options]\n{line}\n'
    with pytest.raises(ConfigError) as caught:
        settings_from_toml(tmp_path, text)
    assert needle in str(caught.value) and "smol" in str(caught.value)


def test_good_sampling_defaults_load_into_the_config(tmp_path: Path) -> None:
    text = ('[models.smol]\nrecipe = "llm"\ntype = "llm"\n[models.smol.options]\n'
            + "".join(f"{k} = {v!r}\n" for k, v in RECIPE.items()))
    settings = settings_from_toml(tmp_path, text)
    assert dict(settings.models["smol"].options) == RECIPE


def _greedy(**knobs: Any) -> Sampling:
    return Sampling.from_args({"temperature": 0, **knobs})


def test_repetition_penalty_lowers_seen_tokens_the_way_transformers_does() -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.5, -1.0, -1.2])
    seen = torch.tensor([True, False, True, False])
    assert _pick(logits, _greedy(), generator, None) == 0
    # 2.0 / 1.5 = 1.33 < 1.5: the unseen token 1 now leads.
    assert _pick(logits, _greedy(repetition_penalty=1.5), generator, seen) == 1
    # A negative seen logit is multiplied: -1.0 * 1.5 = -1.5 falls below the unseen -1.2.
    negative = torch.tensor([-1.0, -1.2, -3.0, -4.0])
    only_first_seen = torch.tensor([True, False, False, False])
    assert _pick(negative, _greedy(), generator, None) == 0
    assert _pick(negative, _greedy(repetition_penalty=1.5), generator, only_first_seen) == 1


def test_top_k_samples_only_among_the_k_most_likely() -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(1)
    logits = torch.tensor([0.0, 3.0, 2.9, 0.1, -1.0])
    one = Sampling.from_args({"temperature": 2.0, "top_k": 1})
    assert {_pick(logits, one, generator, None) for _ in range(50)} == {1}
    two = Sampling.from_args({"temperature": 2.0, "top_k": 2})
    picked = {_pick(logits, two, generator, None) for _ in range(200)}
    assert picked == {1, 2}  # both are likely at temperature 2; nothing else may come
    # top_k and top_p together: the nucleus is cut from the top-k survivors.
    both = Sampling.from_args({"temperature": 1.0, "top_k": 3, "top_p": 0.01})
    assert {_pick(logits, both, generator, None) for _ in range(50)} == {1}


def test_the_load_checks_come_before_torch_is_needed() -> None:
    # A bad default must fail fast even in a process that has not imported torch yet; the
    # check runs in load's first lines, so this only needs the exception (no weights read).
    model = CausalLMModel()
    done = threading.Event()
    with pytest.raises(ModelError):
        model.load(LoadRequest(name="smol", type="llm", device="cpu",
                               options={"top_k": -5}),
                   LoadContext(lambda *_: done.set()))
    assert not done.is_set(), "no progress (such as 'importing torch') before the check"
