"""Declared recipe options (workers/options.py, workers/recipe_options.py).

Each builtin kind's options are one spec that both the supervisor (when the config loads) and
the kind's own ``load`` check with; a plugin may declare one through an entry point. Reading
the specs, and so loading a config, must not import numpy, torch or any model library.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.config import ConfigError, load_settings
from workers import recipe_options, registry
from workers.base import ModelError
from workers.options import Option, OptionSpec

PLUGIN_SPEC = OptionSpec("acme", (Option("size", ("integer",), "how big", low=1),))
NOT_A_SPEC = ("size",)

HEAVY = ("numpy", "torch", "transformers", "onnxruntime", "ctranslate2", "faster_whisper",
         "av", "soundfile", "kokoro", "hibari")


def _kind_module(kind: str) -> Any:
    return importlib.import_module(registry.BUILTIN[kind].partition(":")[0])


@pytest.mark.parametrize("kind", sorted(registry.BUILTIN))
def test_every_builtin_kind_declares_the_options_its_load_checks(kind: str) -> None:
    spec = registry.option_spec(kind)
    assert isinstance(spec, OptionSpec) and spec.kind == kind
    declared = _kind_module(kind)._OPTIONS
    if isinstance(declared, OptionSpec):
        assert declared is spec, f"{kind}'s load checks another spec than the supervisor"
    else:  # a kind not switched over yet: at least the names must be the same
        assert set(declared) == set(spec.names), f"{kind}: {declared} vs {spec.names}"


def test_the_synthetic_faults_are_the_declared_choices() -> None:
    synthetic = _kind_module("synthetic")
    assert set(synthetic.FAULTS) == set(recipe_options.SYNTHETIC["fault"].choices or ())
    assert "none" in synthetic.FAULTS


@pytest.mark.parametrize(("kind", "options", "needle"), [
    ("hibari", {"voise": "heart"}, "unknown hibari option 'voise' (did you mean 'voice'?); "
                                   "allowed: voice, threads, seed, type"),
    ("hibari", {"threads": "4"}, "hibari option 'threads' must be an integer in 1..256, got '4'"),
    ("hibari", {"threads": True}, "must be an integer in 1..256, got True"),
    ("hibari", {"threads": 0}, "must be an integer in 1..256, got 0"),
    ("hibari", {"seed": -1}, "'seed' must be an integer >= 0"),
    ("kokoro-onnx", {"g2p": "misake"}, "got 'misake' (did you mean 'misaki'?)"),
    ("kokoro-onnx", {"british": "yes"}, "'british' must be true or false"),
    ("asr", {"max_audio_seconds": float("nan")}, "'max_audio_seconds' must be a number"),
    ("asr", {"max_audio_seconds": 0.5}, "a number in 1..86400, got 0.5"),
    ("synthetic", {"fail_load": 3}, "'fail_load' must be true or false or a string, got 3"),
    ("synthetic", {"type": "llm"}, "'type' must be one of 'tts', got 'llm'"),
    ("llm", {"dtype": "fp16"}, "'dtype' must be one of 'auto', 'float32', 'float16', 'bfloat16'"),
    ("embedding", {"batch_size": 2048}, "'batch_size' must be an integer in 1..1024"),
])
def test_a_bad_option_is_named_with_what_is_allowed(kind: str, options: dict[str, Any],
                                                    needle: str) -> None:
    spec = registry.option_spec(kind)
    assert spec is not None
    problem = spec.problem(options)
    assert problem is not None and needle in problem, problem
    with pytest.raises(ModelError) as caught:  # what the kind's load raises
        spec.check(options)
    assert caught.value.code == "bad_config" and caught.value.message == problem


@pytest.mark.parametrize(("kind", "options"), [
    ("hibari", {"voice": "heart", "threads": 2, "seed": 0, "type": "tts"}),
    ("synthetic", {"fail_load": "why", "latency_ms": 5, "load_seconds": 0.5, "fault": "flood"}),
    ("synthetic", {"fail_load": False, "lazy_import": "plain"}),
    ("asr", {"max_audio_seconds": 60, "vad_filter": True}),
    ("kokoro", {}),
])
def test_good_options_pass(kind: str, options: dict[str, Any]) -> None:
    spec = registry.option_spec(kind)
    assert spec is not None and spec.problem(options) is None
    spec.check(options)


def test_a_choice_of_one_is_not_met_by_true() -> None:
    option = Option("n", ("integer", "boolean"), "", choices=(1, 2))
    assert option.problem(True) is not None and option.problem(1) is None


def test_a_spec_refuses_to_be_declared_wrong() -> None:
    with pytest.raises(ValueError, match="twice"):
        OptionSpec("x", (Option("a", ("string",), ""), Option("a", ("integer",), "")))
    with pytest.raises(ValueError, match="unknown type"):
        Option("a", ("text",), "")  # type: ignore[arg-type]


# ------------------------------------------------------------------- plugins


def _plugin(monkeypatch: pytest.MonkeyPatch, options_target: str | None) -> None:
    def entry_points(group: str) -> list[SimpleNamespace]:
        if group == registry.ENTRY_POINT_GROUP:
            return [SimpleNamespace(name="acme", value="acme.model:Model")]
        if group == registry.OPTIONS_ENTRY_POINT_GROUP and options_target is not None:
            return [SimpleNamespace(name="acme", value=options_target)]
        return []

    monkeypatch.setattr(registry, "entry_points", entry_points)
    monkeypatch.setattr("supervisor.config.entry_points", entry_points)


def _config(tmp_path: Path, options: str) -> Path:
    path = tmp_path / "lemonade.toml"
    path.write_text(f'[models.thing]\nrecipe = "acme"\ntype = "tts"\n'
                    f'[models.thing.options]\n{options}\n')
    return path


def test_a_plugin_spec_from_its_entry_point_is_checked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _plugin(monkeypatch, f"{__name__}:PLUGIN_SPEC")
    assert registry.option_spec("acme") is PLUGIN_SPEC
    path = _config(tmp_path, "sise = 3")
    with pytest.raises(ConfigError) as caught:
        load_settings(cli={"config": str(path)}, env={}, cwd=tmp_path)
    assert str(caught.value) == (f"{path}: [models.thing] options: unknown acme option 'sise' "
                                 "(did you mean 'size'?); allowed: size")
    good = _config(tmp_path, "size = 3")
    assert load_settings(cli={"config": str(good)}, env={}, cwd=tmp_path).models["thing"]


def test_a_plugin_without_a_spec_is_not_checked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _plugin(monkeypatch, None)
    assert registry.option_spec("acme") is None
    path = _config(tmp_path, "anything = 3")
    settings = load_settings(cli={"config": str(path)}, env={}, cwd=tmp_path)
    assert settings.models["thing"].options == {"anything": 3}


def test_a_plugin_spec_that_is_not_a_spec_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _plugin(monkeypatch, f"{__name__}:NOT_A_SPEC")
    path = _config(tmp_path, "size = 3")
    with pytest.raises(ConfigError, match=r"\[models.thing\] recipe: the option spec of worker "
                                          r"kind 'acme' cannot be loaded: TypeError"):
        load_settings(cli={"config": str(path)}, env={}, cwd=tmp_path)


# ------------------------------------------------------------------- staying light


def test_loading_a_config_with_every_kind_imports_no_model_library(tmp_path: Path) -> None:
    # A fresh interpreter: this one has imported the kinds (and numpy) above.
    tables = "".join(f'[models.m{i}]\nrecipe = "{kind}"\ntype = "tts"\n'
                     for i, kind in enumerate(sorted(registry.BUILTIN)))
    path = tmp_path / "every-kind.toml"
    path.write_text(tables)
    shipped = Path(__file__).resolve().parents[2] / "lemonade.toml"
    script = (
        "import json, sys\n"
        "from supervisor.config import load_settings\n"
        f"for path in {[str(path), str(shipped)]!r}:\n"
        "    load_settings(cli={'config': path}, env={})\n"
        f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('workers.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    heavy, workers = (json.loads(line) for line in done.stdout.splitlines())
    assert heavy == []
    kind_modules = {registry.BUILTIN[k].partition(":")[0] for k in registry.BUILTIN}
    assert not kind_modules & set(workers), workers
    assert "workers.recipe_options" in workers  # so the specs were read, not skipped
