"""The kokoro kind's recipe checks: every mistake is a ``bad_config`` naming the option, and
none of them needs torch or weights to be found (they fail before anything heavy loads)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from workers.base import CallContext, LoadContext, LoadRequest, ModelError
from workers.kokoro_tts import KokoroModel


def load(options: dict[str, Any], device: str = "cpu") -> None:
    KokoroModel().load(LoadRequest("kokoro", "tts", device, options),
                       LoadContext(lambda fraction, message: None))


@pytest.mark.parametrize(("options", "words"), [
    ({"weigths": "random"}, "unknown kokoro option 'weigths' (did you mean 'weights'?)"),
    ({"lang": "fr"}, "option 'lang' must be one of 'a', 'b'"),
    ({"g2p": "festival"}, "option 'g2p' must be one of"),
    ({"seed": "zero"}, "option 'seed' must be an integer"),
    ({"weights": "/no/such/kokoro-v1_0.pth"}, "weights: no file at /no/such/kokoro-v1_0.pth"),
    ({"config": "/no/such/config.json"}, "option config: no file at /no/such/config.json"),
])
def test_recipe_mistakes_are_bad_config_naming_the_option(options, words) -> None:
    with pytest.raises(ModelError) as err:
        load(options)
    assert err.value.code == "bad_config"
    assert words in err.value.message


def test_npu_device_is_refused_by_name() -> None:
    with pytest.raises(ModelError) as err:
        load({}, device="npu")
    assert err.value.code == "bad_config" and "'npu'" in err.value.message


def test_a_config_without_vocab_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"hidden_dim": 512}')
    with pytest.raises(ModelError) as err:
        load({"config": str(config)})
    assert err.value.code == "bad_config" and "not a Kokoro config" in err.value.message


def test_an_unloaded_model_refuses_unknown_ops() -> None:
    ctx = CallContext(lambda data: None, threading.Event())
    with pytest.raises(ModelError) as err:
        KokoroModel().call("transcribe", {}, ctx)
    assert err.value.code == "unsupported"
