"""Voice names and blends as both Kokoro kinds accept them."""

from __future__ import annotations

import pytest

from workers.base import ModelError
from workers.voice_spec import MAX_BLEND, parse_voice_spec

KNOWN = {"af_heart", "af_bella", "af_sky", "am_adam"}


def test_single_voice_has_weight_one() -> None:
    assert parse_voice_spec("af_heart", KNOWN) == [("af_heart", 1.0)]


def test_blend_is_equal_weights_and_weights_are_normalised() -> None:
    assert parse_voice_spec("af_bella+af_sky", KNOWN) == [("af_bella", 0.5), ("af_sky", 0.5)]
    blend = parse_voice_spec("af_bella(3) + af_sky(1)", KNOWN)
    assert blend == [("af_bella", 0.75), ("af_sky", 0.25)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "voice must not be empty"),
        ("af_nobody", "'af_nobody' is not one of this model's voices: af_bella, af_heart"),
        ("af_bella+", "is not a voice name"),
        ("af_bella(0)", "weight of af_bella must be greater than 0"),
        ("../../etc/passwd", "is not a voice name"),
        ("+".join(["af_sky"] * (MAX_BLEND + 1)), "at most"),
        ("a" * 300, "longer than 256"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ModelError) as err:
        parse_voice_spec(spec, KNOWN)
    assert err.value.code == "invalid_request"
    assert message in err.value.message
