"""The speech table both sides read (workers/speech_formats.py) and the voice aliases
(workers/voice_aliases.py): what each kind produces, the defaults, and how OpenAI's voice
names land on a model's voices."""

from __future__ import annotations

import pytest

from workers import audio, hibari_voices, recipe_options, speech, speech_formats, synthetic
from workers.voice_aliases import DEFAULT_ALIASES, OPENAI_VOICES, resolve, table
from workers.voice_catalog import KOKORO_ENGLISH_VOICES, SYNTHETIC_VOICES, Voices


def test_the_workers_use_the_one_table() -> None:
    assert audio.FORMATS == speech_formats.ENCODED_FORMATS
    assert audio.PROGRESSIVE_FORMATS == speech_formats.PROGRESSIVE_FORMATS
    assert synthetic.FORMATS == speech_formats.for_kind("synthetic").formats
    assert (speech.MAX_INPUT_CHARS, speech.MIN_SPEED, speech.MAX_SPEED) == (
        speech_formats.MAX_INPUT_CHARS, speech_formats.MIN_SPEED, speech_formats.MAX_SPEED)
    assert (synthetic.MIN_SPEED, synthetic.MAX_SPEED) == (0.25, 4.0)


@pytest.mark.parametrize(("kind", "default"), [
    ("kokoro", "mp3"), ("kokoro-onnx", "mp3"), ("hibari", "mp3"), ("synthetic", "wav"),
    ("some-plugin", "wav"),
])
def test_default_is_mp3_where_the_kind_encodes_it(kind: str, default: str) -> None:
    formats = speech_formats.for_kind(kind)
    assert formats.default == default
    assert formats.problem(default, kind) is None


def test_aac_is_produced_by_no_kind() -> None:
    assert "aac" in speech_formats.OPENAI_FORMATS
    assert "aac" not in speech_formats.ALL_FORMATS
    for kind in (*speech_formats.KINDS, "plugin"):
        problem = speech_formats.for_kind(kind).problem("aac", kind)
        assert problem is not None and problem.startswith("'response_format'")


def test_a_format_of_another_kind_is_named() -> None:
    problem = speech_formats.for_kind("synthetic").problem("mp3", "synthetic")
    assert problem == "'response_format' mp3 is not produced by synthetic models; " \
                      "allowed: wav, pcm"
    assert "'xyz'" in str(speech_formats.for_kind("hibari").problem("xyz", "hibari"))


def test_every_openai_voice_has_an_entry_per_kind() -> None:
    for kind, entries in DEFAULT_ALIASES.items():
        assert set(entries) == set(OPENAI_VOICES), kind
    assert set(DEFAULT_ALIASES["kokoro"].values()) <= set(KOKORO_ENGLISH_VOICES)
    assert set(DEFAULT_ALIASES["synthetic"].values()) <= set(SYNTHETIC_VOICES)
    assert DEFAULT_ALIASES["kokoro"]["alloy"] == "af_alloy"
    registry = hibari_voices.registry()
    if registry:
        assert set(DEFAULT_ALIASES["hibari"].values()) <= set(registry)


def test_resolution_order() -> None:
    known = Voices(["heart"], "heart")
    # A default entry whose voice is not on disk falls back to the default voice.
    assert resolve("hibari", {}, "onyx", known) == "heart"
    assert resolve("hibari", {}, "onyx", Voices(["fenrir", "heart"], "heart")) == "fenrir"
    # A recipe's own entry wins, as written; a real voice is never hidden; others pass.
    assert resolve("hibari", {"voice_aliases": {"onyx": "kore"}}, "onyx", known) == "kore"
    assert resolve("synthetic", {"voice_aliases": {"low": "high"}}, "low",
                   Voices(["high", "low", "tone"], "tone")) == "high"
    assert resolve("synthetic", {}, "low", Voices(["high", "low", "tone"], "tone")) == "low"
    assert resolve("synthetic", {}, "nobody", None) == "nobody"
    assert resolve("plugin", {}, "alloy", None) == "alloy"
    assert table("synthetic", {"voice_aliases": {"narrator": "low"}}, None)["narrator"] == "low"


@pytest.mark.parametrize(("spec", "value", "words"), [
    (recipe_options.SYNTHETIC, {"alloy": "nobody"}, ["'alloy'", "'nobody'", "tone"]),
    (recipe_options.SYNTHETIC, "alloy=tone", ["a table"]),
    (recipe_options.KOKORO, {"al loy": "af_bella"}, ["'al loy'"]),
    (recipe_options.KOKORO_ONNX, {"alloy": 3}, ["'alloy'", "3"]),
    (recipe_options.KOKORO, {"alloy": ""}, ["'alloy'"]),
])
def test_bad_voice_aliases_are_refused_naming_the_entry(spec, value, words) -> None:
    problem = spec.problem({"voice_aliases": value})
    assert problem is not None and "'voice_aliases'" in problem
    for word in words:
        assert word in problem, problem


def test_good_voice_aliases_pass() -> None:
    assert recipe_options.SYNTHETIC.problem({"voice_aliases": {"alloy": "high"}}) is None
    assert recipe_options.KOKORO.problem(
        {"voice_aliases": {"alloy": "af_bella(2)+af_sky", "narrator": "bm_george"}}) is None
    if hibari_voices.registry():
        assert recipe_options.HIBARI.problem({"voice_aliases": {"nova": "kore"}}) is None
        assert recipe_options.HIBARI.problem({"voice_aliases": {"nova": "x"}}) is not None
