"""Tests for supervisor.config: layering, validation and the error messages users see."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from supervisor import config
from supervisor.config import (
    ConfigError,
    FrozenDict,
    Group,
    Recipe,
    Settings,
    effective_preload,
    is_loopback_host,
    load_settings,
)

MINIMAL_MODEL = '[models.tts1]\nrecipe = "synthetic"\n'


@pytest.fixture(autouse=True)
def _known_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hermetic kinds: two built-ins (one without a default type) and one plugin.
    monkeypatch.setattr(config, "BUILTIN_KINDS", {"synthetic": "tts", "generic": None})
    monkeypatch.setattr(config, "entry_points", lambda group: [SimpleNamespace(name="acme-asr")])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str | None = None, **kwargs: Any) -> Settings:
    if text is not None:
        write(tmp_path / "lemonade.toml", text)
    kwargs.setdefault("env", {})
    return load_settings(cwd=tmp_path, **kwargs)


def error(tmp_path: Path, text: str | None = None, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **kwargs)
    return str(info.value)


# --- defaults and file discovery ---------------------------------------------------------


def test_defaults_without_any_file(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings == Settings(sources=settings.sources, data_dir=str(tmp_path / ".lemonade"))
    assert settings.config_path is None
    assert settings.models == {} and settings.groups == {}
    assert settings.auto_unload_timer_s == 300.0
    assert settings.memory_budget == "auto"
    assert set(settings.sources.values()) == {"default"}
    assert settings.sources["auto_unload_timer_s"] == "default"
    assert settings.sources["api_key"] == "default"


def test_cwd_lemonade_toml_is_found(tmp_path: Path) -> None:
    settings = load(tmp_path, "[server]\nport = 9001\n")
    assert settings.port == 9001
    assert settings.config_path == str(tmp_path / "lemonade.toml")
    assert settings.sources["port"] == f"file {tmp_path / 'lemonade.toml'}"
    assert settings.sources["host"] == "default"


def test_config_from_env_and_cli_precedence(tmp_path: Path) -> None:
    write(tmp_path / "lemonade.toml", "[server]\nport = 1\n")
    write(tmp_path / "env.toml", "[server]\nport = 2\n")
    write(tmp_path / "cli.toml", "[server]\nport = 3\n")
    env = {"LEMONADE_CONFIG": "env.toml"}
    assert load(tmp_path, env=env).port == 2
    settings = load(tmp_path, env=env, cli={"config": str(tmp_path / "cli.toml")})
    assert settings.port == 3
    assert settings.config_path == str(tmp_path / "cli.toml")


def test_empty_env_values_count_as_unset(tmp_path: Path) -> None:
    write(tmp_path / "lemonade.toml", "[server]\nport = 1234\n")
    settings = load(tmp_path, env={"LEMONADE_CONFIG": "", "LEMONADE_PORT": ""})
    assert settings.port == 1234


def test_named_config_that_does_not_exist(tmp_path: Path) -> None:
    message = error(tmp_path, cli={"config": "missing.toml"})
    assert "missing.toml" in message and "not found" in message and "--config" in message
    message = error(tmp_path, env={"LEMONADE_CONFIG": "gone.toml"})
    assert "gone.toml" in message and "LEMONADE_CONFIG" in message


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    message = error(tmp_path, "[server\nport = 1\n")
    assert "lemonade.toml" in message and "invalid TOML" in message and "line 1" in message


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    assert "dir.toml" in error(tmp_path, cli={"config": "dir.toml"})


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMONADE_PORT", "7777")
    assert load_settings(cwd=tmp_path).port == 7777


# --- the global idle timer and sources at each level -------------------------------------


def test_auto_unload_timer_precedence_and_sources(tmp_path: Path) -> None:
    path = tmp_path / "lemonade.toml"
    assert load(tmp_path).sources["auto_unload_timer_s"] == "default"

    settings = load(tmp_path, '[server]\nauto_unload_timer = "5m"\n')
    assert settings.auto_unload_timer_s == 300.0
    assert settings.sources["auto_unload_timer_s"] == f"file {path}"

    env = {"LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER": "90s"}
    settings = load(tmp_path, env=env)
    assert settings.auto_unload_timer_s == 90.0
    assert settings.sources["auto_unload_timer_s"] == "env LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER"

    settings = load(tmp_path, env=env, cli={"auto_unload_timer": "1h"})
    assert settings.auto_unload_timer_s == 3600.0
    assert settings.sources["auto_unload_timer_s"] == "cli --auto-unload-timer"

    settings = load(tmp_path, env=env, cli={"auto_unload_timer": None})
    assert settings.sources["auto_unload_timer_s"] == "env LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER"


def test_env_timer_applies_when_file_lacks_it(tmp_path: Path) -> None:
    settings = load(
        tmp_path, "[server]\nport = 8100\n", env={"LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER": "120"}
    )
    assert settings.auto_unload_timer_s == 120.0
    assert settings.port == 8100


@pytest.mark.parametrize("value", ["0", '"0"', '"never"', '"0s"'])
def test_auto_unload_timer_zero_means_never(tmp_path: Path, value: str) -> None:
    settings = load(tmp_path, f"[server]\nauto_unload_timer = {value}\n")
    assert settings.auto_unload_timer_s == math.inf


def test_auto_unload_timer_zero_from_env_and_cli(tmp_path: Path) -> None:
    env = {"LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER": "never"}
    assert load(tmp_path, env=env).auto_unload_timer_s == math.inf
    assert load(tmp_path, cli={"auto_unload_timer": 0}).auto_unload_timer_s == math.inf


def test_bad_timer_errors_name_their_origin(tmp_path: Path) -> None:
    message = error(tmp_path, '[server]\nauto_unload_timer = "soon"\n')
    assert "lemonade.toml: [server] auto_unload_timer" in message and "'soon'" in message
    (tmp_path / "lemonade.toml").unlink()
    message = error(tmp_path, env={"LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER": "-5"})
    assert message.startswith("env LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER:")
    assert '"never"' in message
    message = error(tmp_path, cli={"auto_unload_timer": "abc"})
    assert message.startswith("--auto-unload-timer:")


# --- [server] values ------------------------------------------------------------------------


FULL_SERVER = (
    """
[server]
host = "localhost"
port = 0
auto_unload_timer = 600
max_loaded_models = 3
max_loaded_per_type = { llm = 1, tts = 2 }
memory_budget = "12GiB"
default_model = "tts1"
max_parallel_loads = 2
min_residency = "30s"
stop_grace = 0
drain_timeout = "2m"
load_timeout = "90s"
call_timeout = "1h"
load_failure_cooldown = "5s"
load_failure_cooldown_max = "10m"
heartbeat_interval = "500ms"
heartbeat_timeout = "3s"
log_level = "DEBUG"
preload = ["tts1"]
data_dir = "/var/cache/lemonade"
zygotes = "Eager"
zygote_idle_timeout = "2m"
access_log = false
vram_release_wait = "2s"
handshake_timeout = "20s"
warmup_timeout = "40s"
admission_timeout = "50s"
header_timeout = "3s"
body_timeout = "4s"
max_connections = 100
max_waiting = 0
cluster = "127.0.0.1:6379"
"""
    + MINIMAL_MODEL
)


def test_every_server_key_from_file(tmp_path: Path) -> None:
    s = load(tmp_path, FULL_SERVER)
    assert (s.host, s.port, s.auto_unload_timer_s) == ("localhost", 0, 600.0)
    assert s.max_loaded_models == 3
    assert s.max_loaded_per_type == {"llm": 1, "tts": 2}
    assert s.memory_budget == 12 * 2**30
    assert s.default_model == "tts1"
    assert s.max_parallel_loads == 2
    assert s.min_residency_s == 30.0
    assert s.stop_grace_s == 0.0  # here 0 is zero, not "never"
    assert s.drain_timeout_s == 120.0
    assert s.load_timeout_s == 90.0
    assert s.call_timeout_s == 3600.0
    assert s.load_failure_cooldown_s == 5.0
    assert s.load_failure_cooldown_max_s == 600.0
    assert s.heartbeat_interval_s == 0.5
    assert s.heartbeat_timeout_s == 3.0
    assert s.log_level == "debug"
    assert s.preload == ("tts1",)
    assert s.data_dir == "/var/cache/lemonade"
    assert s.zygotes == "eager"
    assert s.zygote_idle_timeout_s == 120.0
    assert s.access_log is False
    assert s.vram_release_wait_s == 2.0
    assert (s.handshake_timeout_s, s.warmup_timeout_s, s.admission_timeout_s) == (20, 40, 50)
    assert (s.header_timeout_s, s.body_timeout_s) == (3.0, 4.0)
    assert (s.max_connections, s.max_waiting) == (100, None)  # 0 = no cap
    assert s.cluster == "127.0.0.1:6379"
    file_source = f"file {tmp_path / 'lemonade.toml'}"
    assert all(source == file_source for name, source in s.sources.items() if name != "api_key")


@pytest.mark.parametrize(
    ("line", "key", "hint"),
    [
        ('port = "abc"', "port", "integer"),
        ("port = 70000", "port", "65535"),
        ("port = -1", "port", "65535"),
        ("port = 80.0", "port", "integer"),
        ("port = true", "port", "integer"),
        ('host = ""', "host", "host"),
        ("host = 127", "host", "host"),
        ('host = "a b"', "host", "host"),
        ("max_loaded_models = -2", "max_loaded_models", "unlimited"),
        ('max_loaded_models = "3"', "max_loaded_models", "integer"),
        ('memory_budget = "lots"', "memory_budget", '"auto"'),
        ("memory_budget = 0", "memory_budget", '"none"'),
        ("memory_budget = true", "memory_budget", "size"),
        ("max_parallel_loads = 0", "max_parallel_loads", ">= 1"),
        ('min_residency = "never"', "min_residency", "duration"),
        ("stop_grace = -1", "stop_grace", "duration"),
        ("load_timeout = 0", "load_timeout", "greater than 0"),
        ("heartbeat_interval = 0", "heartbeat_interval", "greater than 0"),
        ('call_timeout = "forever"', "call_timeout", "duration"),
        ('log_level = "loud"', "log_level", "warning"),
        ('zygotes = "sometimes"', "zygotes", "off, lazy, eager"),
        ("zygotes = true", "zygotes", "off, lazy, eager"),
        ('zygote_idle_timeout = "soon"', "zygote_idle_timeout", '"never"'),
        ("zygote_idle_timeout = -1", "zygote_idle_timeout", "duration"),
        ("zygote_idle_timeout = true", "zygote_idle_timeout", "duration"),
        ('preload = "tts1"', "preload", "array"),
        ('preload = ["bad name"]', "preload", "model name"),
        ('default_model = "bad/name"', "default_model", "model name"),
        ("max_loaded_per_type = 1", "max_loaded_per_type", "table"),
        ("max_loaded_per_type = { llm = 0 }", "max_loaded_per_type.llm", ">= 1"),
        ('max_loaded_per_type = { llm = "1" }', "max_loaded_per_type.llm", "integer"),
        ("max_loaded_per_type = { vision = 1 }", "max_loaded_per_type", "embedding"),
    ],
)
def test_bad_server_values(tmp_path: Path, line: str, key: str, hint: str) -> None:
    message = error(tmp_path, f"[server]\n{line}\n")
    assert f"lemonade.toml: [server] {key}" in message
    assert hint in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", None), ("-1", None), ("1", 1), (" 5 ", 5)],
)
def test_max_loaded_models_env(tmp_path: Path, value: str, expected: int | None) -> None:
    settings = load(tmp_path, env={"LEMONADE_MAX_LOADED_MODELS": value})
    assert settings.max_loaded_models == expected
    assert settings.sources["max_loaded_models"] == "env LEMONADE_MAX_LOADED_MODELS"


def test_max_loaded_models_file_zero_is_unlimited(tmp_path: Path) -> None:
    assert load(tmp_path, "[server]\nmax_loaded_models = 0\n").max_loaded_models is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("AUTO", "auto"),
        ("none", None),
        ("off", None),
        ("800MB", 800_000_000),
        ("1.5GiB", 3 * 2**29),
        ("1073741824", 2**30),
    ],
)
def test_memory_budget_forms(tmp_path: Path, value: str, expected: object) -> None:
    assert load(tmp_path, env={"LEMONADE_MEMORY_BUDGET": value}).memory_budget == expected
    assert load(tmp_path, cli={"memory_budget": value}).memory_budget == expected


def test_memory_budget_int_in_file(tmp_path: Path) -> None:
    assert load(tmp_path, "[server]\nmemory_budget = 4096\n").memory_budget == 4096


def test_env_values_parsed_and_recorded(tmp_path: Path) -> None:
    env = {
        "LEMONADE_HOST": "::1",
        "LEMONADE_PORT": "8123",
        "LEMONADE_LOG_LEVEL": "Warning",
        "LEMONADE_PRELOAD": "tts1, tts2,",
        "LEMONADE_DEFAULT_MODEL": "tts2",
        "LEMONADE_MAX_PARALLEL_LOADS": "3",
        "LEMONADE_MIN_RESIDENCY": "1m",
        "LEMONADE_STOP_GRACE": "0",
        "LEMONADE_LOAD_TIMEOUT": "30s",
        "LEMONADE_API_KEY": "sekrit",
    }
    text = MINIMAL_MODEL + '[models.tts2]\nrecipe = "synthetic"\n'
    s = load(tmp_path, text, env=env)
    assert (s.host, s.port, s.log_level) == ("::1", 8123, "warning")
    assert s.preload == ("tts1", "tts2")
    assert s.default_model == "tts2"
    assert s.max_parallel_loads == 3
    assert (s.min_residency_s, s.stop_grace_s, s.load_timeout_s) == (60.0, 0.0, 30.0)
    assert s.api_key == "sekrit"
    assert "sekrit" not in repr(s)
    assert s.sources["api_key"] == "env LEMONADE_API_KEY"
    assert s.sources["preload"] == "env LEMONADE_PRELOAD"
    assert s.sources["stop_grace_s"] == "env LEMONADE_STOP_GRACE"
    assert s.sources["load_timeout_s"] == "env LEMONADE_LOAD_TIMEOUT"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LEMONADE_PORT", "eighty"),
        ("LEMONADE_PORT", "99999"),
        ("LEMONADE_MAX_LOADED_MODELS", "many"),
        ("LEMONADE_MEMORY_BUDGET", "big"),
        ("LEMONADE_LOG_LEVEL", "verbose"),
        ("LEMONADE_PRELOAD", "a b"),
        ("LEMONADE_DEFAULT_MODEL", "-x"),
        ("LEMONADE_MAX_PARALLEL_LOADS", "0"),
        ("LEMONADE_MIN_RESIDENCY", "-1s"),
        ("LEMONADE_STOP_GRACE", "later"),
        ("LEMONADE_LOAD_TIMEOUT", "0"),
    ],
)
def test_bad_env_values_name_the_variable(tmp_path: Path, var: str, value: str) -> None:
    message = error(tmp_path, env={var: value})
    assert message.startswith(f"env {var}:")
    assert repr(value) in message


def test_cli_overrides_env_and_file(tmp_path: Path) -> None:
    text = '[server]\nport = 1000\nlog_level = "error"\n' + MINIMAL_MODEL
    env = {"LEMONADE_PORT": "2000", "LEMONADE_LOG_LEVEL": "info", "LEMONADE_HOST": "127.0.0.2"}
    cli = {
        "port": 3000,
        "host": None,
        "log_level": "debug",
        "max_loaded_models": "2",
        "memory_budget": "off",
        "default_model": "tts1",
        "preload": ["tts1"],
        "recipes": (),
    }
    s = load(tmp_path, text, env=env, cli=cli)
    assert (s.port, s.log_level, s.host) == (3000, "debug", "127.0.0.2")
    assert s.max_loaded_models == 2 and s.memory_budget is None
    assert s.default_model == "tts1" and s.preload == ("tts1",)
    assert s.sources["port"] == "cli --port"
    assert s.sources["log_level"] == "cli --log-level"
    assert s.sources["host"] == "env LEMONADE_HOST"
    assert s.sources["preload"] == "cli --preload"


@pytest.mark.parametrize(
    ("key", "value", "flag"),
    [
        ("port", "x", "--port"),
        ("port", True, "--port"),
        ("max_loaded_models", "x", "--max-loaded-models"),
        ("memory_budget", "x", "--memory-budget"),
        ("log_level", "x", "--log-level"),
        ("preload", ["bad name"], "--preload"),
        ("default_model", "", "--default-model"),
        ("host", "", "--host"),
    ],
)
def test_bad_cli_values_name_the_flag(tmp_path: Path, key: str, value: object, flag: str) -> None:
    assert error(tmp_path, cli={key: value}).startswith(f"{flag}:")


def test_cli_refuses_api_key_and_unknown_options(tmp_path: Path) -> None:
    message = error(tmp_path, cli={"api_key": "k"})
    assert "LEMONADE_API_KEY" in message
    message = error(tmp_path, cli={"prot": 1})
    assert "--prot" in message and "port" in message


def test_cli_preload_accepts_comma_lists(tmp_path: Path) -> None:
    text = MINIMAL_MODEL + '[models.b]\nrecipe = "synthetic"\n'
    s = load(tmp_path, text, cli={"preload": ["tts1,b", "tts1"]})
    assert s.preload == ("tts1", "b")


# --- file structure errors ---------------------------------------------------------------


def test_unknown_server_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    message = error(tmp_path, "[server]\nprot = 8000\n")
    assert "lemonade.toml: [server]" in message
    assert "'prot'" in message
    assert "port" in message and "auto_unload_timer" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = error(tmp_path, "[serverr]\nport = 1\n")
    assert "lemonade.toml" in message and "'serverr'" in message and "[server]" in message
    assert "'debug'" in error(tmp_path, "debug = true\n")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    assert "[server]" in error(tmp_path, "server = 1\n")
    assert "[models]" in error(tmp_path, "models = 1\n")
    assert "[models.a]" in error(tmp_path, "models = { a = 1 }\n")


def test_api_key_in_file_is_refused(tmp_path: Path) -> None:
    message = error(tmp_path, '[server]\napi_key = "abc"\n')
    assert "lemonade.toml" in message and "api_key" in message
    assert "LEMONADE_API_KEY" in message


# --- models ----------------------------------------------------------------------------------


KOKORO = """
[groups.gpu]
exclusive = true

[models.kokoro]
recipe = "generic"  # a kind with no declared option spec: its options pass through as they are
device = "cuda:0"
idle_timeout = "2m"
type = "tts"
priority = 5
memory = "1GiB"
group = "gpu"
pinned = true
preload = true
warmup = true
max_concurrency = 2

[models.kokoro.options]
voice = "af_heart"
speeds = [1.0, 1.5]
nested = { a = 1 }
"""


def test_full_model_table(tmp_path: Path) -> None:
    s = load(tmp_path, KOKORO)
    path = str(tmp_path / "lemonade.toml")
    assert s.groups == {"gpu": Group(name="gpu", exclusive=True)}
    assert s.models["kokoro"] == Recipe(
        name="kokoro",
        kind="generic",
        type="tts",
        device="cuda:0",
        idle_timeout_s=120.0,
        priority=5,
        memory_bytes=2**30,
        group="gpu",
        pinned=True,
        preload=True,
        warmup=True,
        max_concurrency=2,
        options={"voice": "af_heart", "speeds": (1.0, 1.5), "nested": {"a": 1}},
        source=path,
    )


def test_model_defaults(tmp_path: Path) -> None:
    recipe = load(tmp_path, MINIMAL_MODEL).models["tts1"]
    assert recipe.kind == "synthetic" and recipe.type == "tts"
    assert recipe.device == "auto"
    assert recipe.idle_timeout_s is None
    assert recipe.priority == 1
    assert recipe.memory_bytes is None
    assert recipe.group is None
    assert not (recipe.pinned or recipe.preload or recipe.warmup)
    assert recipe.max_concurrency == 4
    assert recipe.options == {}


@pytest.mark.parametrize("value", ["0", '"never"', '"0s"'])
def test_model_idle_timeout_never(tmp_path: Path, value: str) -> None:
    text = MINIMAL_MODEL + f"idle_timeout = {value}\n"
    assert load(tmp_path, text).models["tts1"].idle_timeout_s == math.inf


@pytest.mark.parametrize(("value", "seconds"), [("45", 45.0), ('"1h30m"', 5400.0)])
def test_model_idle_timeout_parsed(tmp_path: Path, value: str, seconds: float) -> None:
    text = MINIMAL_MODEL + f"idle_timeout = {value}\n"
    assert load(tmp_path, text).models["tts1"].idle_timeout_s == seconds


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "npu"])
def test_model_devices(tmp_path: Path, device: str) -> None:
    text = MINIMAL_MODEL + f'device = "{device}"\n'
    assert load(tmp_path, text).models["tts1"].device == device


@pytest.mark.parametrize(
    ("line", "key", "hint"),
    [
        ('idle_timeout = "abc"', "idle_timeout", '"1h30m"'),
        ("idle_timeout = -5", "idle_timeout", '"never"'),
        ('device = "gpu"', "device", "cuda:N"),
        ('device = "cuda:"', "device", "cuda:N"),
        ('priority = "high"', "priority", "integer"),
        ('memory = "lots"', "memory", "GiB"),
        ("memory = -1", "memory", "GiB"),
        ('pinned = "yes"', "pinned", "true or false"),
        ("preload = 1", "preload", "true or false"),
        ('warmup = "no"', "warmup", "true or false"),
        ("max_concurrency = 0", "max_concurrency", ">= 1"),
        ("group = 3", "group", "groups"),
        ('type = "vision"', "type", "embedding"),
        ("options = 3", "options", "table"),
        ("options = { when = 1979-05-27 }", "options.when", "date"),
        ("options = { list = [1, 07:32:00] }", "options.list[1]", "date"),
    ],
)
def test_bad_model_values(tmp_path: Path, line: str, key: str, hint: str) -> None:
    message = error(tmp_path, MINIMAL_MODEL + line + "\n")
    assert f"lemonade.toml: [models.tts1] {key}" in message
    assert hint in message


def test_unknown_model_key_names_file_model_and_allowed(tmp_path: Path) -> None:
    message = error(tmp_path, MINIMAL_MODEL + "idle_timout = 5\n")
    assert "lemonade.toml: [models.tts1]" in message
    assert "'idle_timout'" in message
    assert "idle_timeout" in message and "max_concurrency" in message


def test_missing_recipe_key(tmp_path: Path) -> None:
    message = error(tmp_path, '[models.a]\ntype = "tts"\n')
    assert "[models.a]" in message and "'recipe'" in message and "synthetic" in message


def test_unknown_kind_lists_known_kinds(tmp_path: Path) -> None:
    message = error(tmp_path, '[models.a]\nrecipe = "nope"\n')
    assert "lemonade.toml: [models.a] recipe" in message and "'nope'" in message
    assert "acme-asr, generic, synthetic" in message


def test_plugin_kind_from_entry_points(tmp_path: Path) -> None:
    text = '[models.whisper]\nrecipe = "acme-asr"\ntype = "asr"\n'
    recipe = load(tmp_path, text).models["whisper"]
    assert (recipe.kind, recipe.type, recipe.priority) == ("acme-asr", "asr", 2)


def test_entry_points_not_scanned_without_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(group: str) -> list[Any]:
        raise AssertionError("entry points scanned")

    monkeypatch.setattr(config, "entry_points", boom)
    assert load(tmp_path, "[server]\nport = 1\n").port == 1


def test_known_kinds_uses_real_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake(group: str) -> list[Any]:
        seen.append(group)
        return [SimpleNamespace(name="zeta")]

    monkeypatch.setattr(config, "entry_points", fake)
    assert config.known_kinds() == ("generic", "synthetic", "zeta")
    assert seen == ["lemonade.workers"]


def test_type_explicit_beats_options_and_kind(tmp_path: Path) -> None:
    text = '[models.a]\nrecipe = "generic"\ntype = "llm"\noptions = { type = "asr" }\n'
    recipe = load(tmp_path, text).models["a"]
    assert recipe.type == "llm" and recipe.priority == 0


def test_type_from_options_beats_kind(tmp_path: Path) -> None:
    text = '[models.a]\nrecipe = "generic"\noptions = { type = "embedding" }\n'
    recipe = load(tmp_path, text).models["a"]
    assert recipe.type == "embedding" and recipe.priority == 1
    assert recipe.options == {"type": "embedding"}


def test_type_from_kind_default(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL_MODEL).models["tts1"].type == "tts"


def test_type_missing_for_kind_without_default(tmp_path: Path) -> None:
    message = error(tmp_path, '[models.a]\nrecipe = "generic"\n')
    assert "[models.a]" in message and "type" in message and "llm" in message
    message = error(tmp_path, '[models.a]\nrecipe = "generic"\noptions = { type = 3 }\n')
    assert "set type" in message


def test_options_type_must_be_a_model_type(tmp_path: Path) -> None:
    message = error(tmp_path, '[models.a]\nrecipe = "generic"\noptions = { type = "x" }\n')
    assert "[models.a] options.type" in message


@pytest.mark.parametrize("name", ['"-lead"', '"has space"', '"a/b"', '"' + "x" * 129 + '"'])
def test_bad_model_names(tmp_path: Path, name: str) -> None:
    message = error(tmp_path, f'[models.{name}]\nrecipe = "synthetic"\n')
    assert "model name" in message


def test_model_name_with_allowed_punctuation(tmp_path: Path) -> None:
    text = '[models."qwen2.5:7b-q4_K"]\nrecipe = "synthetic"\n'
    assert "qwen2.5:7b-q4_K" in load(tmp_path, text).models


def test_unknown_group_reference(tmp_path: Path) -> None:
    message = error(tmp_path, MINIMAL_MODEL + 'group = "npu"\n')
    assert "lemonade.toml: [models.tts1] group" in message
    assert "'npu'" in message and "[groups.npu]" in message


def test_group_table_errors(tmp_path: Path) -> None:
    message = error(tmp_path, "[groups.gpu]\nexclusiv = true\n")
    assert "[groups.gpu]" in message and "'exclusiv'" in message and "exclusive" in message
    message = error(tmp_path, '[groups.gpu]\nexclusive = "yes"\n')
    assert "[groups.gpu] exclusive" in message and "true or false" in message
    assert Group("gpu") == load(tmp_path, "[groups.gpu]\n").groups["gpu"]


# --- recipe files ----------------------------------------------------------------------------


def test_recipe_files_merge_from_cli(tmp_path: Path) -> None:
    write(tmp_path / "lemonade.toml", MINIMAL_MODEL)
    write(tmp_path / "a.toml", '[groups.npu]\nexclusive = true\n[models.a]\nrecipe = "synthetic"\n')
    write(tmp_path / "b.toml", '[models.b]\nrecipe = "synthetic"\ngroup = "npu"\n')
    s = load(tmp_path, cli={"recipes": ["a.toml", str(tmp_path / "b.toml")]})
    assert list(s.models) == ["tts1", "a", "b"]
    assert s.models["a"].source == str(tmp_path / "a.toml")
    assert s.models["b"].group == "npu"
    assert s.groups["npu"].exclusive


def test_recipe_files_from_env_and_cli_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", '[models.a]\nrecipe = "synthetic"\n')
    write(tmp_path / "b.toml", '[models.b]\nrecipe = "synthetic"\n')
    env = {"LEMONADE_RECIPES": os.pathsep.join(["a.toml", "b.toml", ""])}
    assert list(load(tmp_path, env=env).models) == ["a", "b"]
    assert list(load(tmp_path, env=env, cli={"recipes": ["b.toml"]}).models) == ["b"]
    # click passes () for an unused multiple option: that is "not given".
    assert list(load(tmp_path, env=env, cli={"recipes": ()}).models) == ["a", "b"]


def test_duplicate_model_across_files_names_both(tmp_path: Path) -> None:
    write(tmp_path / "lemonade.toml", MINIMAL_MODEL)
    write(tmp_path / "extra.toml", MINIMAL_MODEL)
    message = error(tmp_path, cli={"recipes": ["extra.toml"]})
    assert "'tts1'" in message and "twice" in message
    assert str(tmp_path / "lemonade.toml") in message and str(tmp_path / "extra.toml") in message


def test_duplicate_group_and_same_file_twice(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", "[groups.gpu]\n")
    write(tmp_path / "b.toml", "[groups.gpu]\n")
    message = error(tmp_path, cli={"recipes": ["a.toml", "b.toml"]})
    assert "group 'gpu'" in message and "a.toml" in message and "b.toml" in message
    write(tmp_path / "m.toml", MINIMAL_MODEL)
    message = error(tmp_path, cli={"recipes": ["m.toml", "m.toml"]})
    assert "model 'tts1'" in message and "m.toml" in message


def test_recipe_file_may_not_hold_server(tmp_path: Path) -> None:
    write(tmp_path / "r.toml", "[server]\nport = 1\n")
    message = error(tmp_path, cli={"recipes": ["r.toml"]})
    assert "r.toml" in message and "[server]" in message and "[models.*]" in message
    write(tmp_path / "r.toml", "other = 1\n")
    assert "'other'" in error(tmp_path, cli={"recipes": ["r.toml"]})


def test_missing_recipe_file(tmp_path: Path) -> None:
    message = error(tmp_path, env={"LEMONADE_RECIPES": "nope.toml"})
    assert "nope.toml" in message and "LEMONADE_RECIPES" in message


def test_recipe_file_errors_name_that_file(tmp_path: Path) -> None:
    write(tmp_path / "r.toml", MINIMAL_MODEL + "pinned = 1\n")
    message = error(tmp_path, cli={"recipes": ["r.toml"]})
    assert f"{tmp_path / 'r.toml'}: [models.tts1] pinned" in message


# --- cross-checks ----------------------------------------------------------------------------


def test_preload_and_default_model_must_be_configured(tmp_path: Path) -> None:
    message = error(tmp_path, MINIMAL_MODEL, env={"LEMONADE_PRELOAD": "tts1,ghost"})
    assert message.startswith("env LEMONADE_PRELOAD:") and "'ghost'" in message
    assert "tts1" in message
    message = error(tmp_path, '[server]\ndefault_model = "ghost"\n' + MINIMAL_MODEL)
    assert "lemonade.toml: [server] default_model" in message and "'ghost'" in message
    message = error(tmp_path, MINIMAL_MODEL, cli={"default_model": "ghost"})
    assert message.startswith("--default-model:")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_non_loopback_without_key_is_refused(tmp_path: Path, host: str) -> None:
    message = error(tmp_path, f'[server]\nhost = "{host}"\n')
    assert "LEMONADE_API_KEY" in message and host in message
    assert "lemonade.toml: [server] host" in message
    message = error(tmp_path, cli={"host": host})
    assert message.startswith("--host:")


def test_non_loopback_with_key_is_allowed(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"LEMONADE_HOST": "0.0.0.0", "LEMONADE_API_KEY": "k"})
    assert settings.host == "0.0.0.0" and settings.api_key == "k"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"]
)
def test_loopback_hosts_need_no_key(tmp_path: Path, host: str) -> None:
    assert is_loopback_host(host)
    assert load(tmp_path, cli={"host": host}).host == host.strip("[]")


def test_cooldown_max_below_cooldown(tmp_path: Path) -> None:
    message = error(
        tmp_path, '[server]\nload_failure_cooldown = "1m"\nload_failure_cooldown_max = "30s"\n'
    )
    assert "load_failure_cooldown_max" in message and "lemonade.toml" in message


# --- effective_preload and immutability -----------------------------------------------------


def test_effective_preload_dedupes_in_config_order(tmp_path: Path) -> None:
    text = "".join(
        f'[models.{name}]\nrecipe = "synthetic"\npreload = {flag}\n'
        for name, flag in [("a", "false"), ("b", "true"), ("c", "false"), ("d", "true")]
    )
    settings = load(tmp_path, text, env={"LEMONADE_PRELOAD": "c,d,a"})
    assert effective_preload(settings) == ("b", "d", "c", "a")
    assert effective_preload(Settings()) == ()


def test_settings_are_immutable(tmp_path: Path) -> None:
    s = load(tmp_path, KOKORO + "[server]\nmax_loaded_per_type = { llm = 1 }\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    for mapping in (s.models, s.groups, s.sources, s.max_loaded_per_type):
        with pytest.raises(TypeError):
            mapping["x"] = 1  # type: ignore[index]
    options = s.models["kokoro"].options
    with pytest.raises(TypeError):
        options["voice"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        options["nested"]["a"] = 2
    with pytest.raises(TypeError):
        options["nested"].update(a=2)
    assert options["speeds"] == (1.0, 1.5)


def test_frozen_config_still_serialises_and_copies(tmp_path: Path) -> None:
    s = load(tmp_path, KOKORO)
    recipe = s.models["kokoro"]
    wire = msgpack.unpackb(msgpack.packb(recipe.options), raw=False)
    assert wire == {"voice": "af_heart", "speeds": [1.0, 1.5], "nested": {"a": 1}}
    assert json.loads(json.dumps(dataclasses.asdict(recipe)))["options"]["nested"] == {"a": 1}
    assert copy.deepcopy(s) == s
    assert pickle.loads(pickle.dumps(s)) == s
    assert isinstance(copy.copy(recipe.options), FrozenDict)


def test_direct_construction_is_frozen_too() -> None:
    recipe = Recipe(name="a", kind="synthetic", type="tts", options={"x": [1, {"y": 2}]})
    assert recipe.options == {"x": (1, {"y": 2})}
    settings = Settings(models={"a": recipe}, preload=["a"])  # type: ignore[arg-type]
    assert settings.preload == ("a",)
    with pytest.raises(TypeError):
        settings.models.pop("a")  # type: ignore[attr-defined]


def test_data_dir_defaults_next_to_the_config_file(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "lemonade.toml").write_text("[server]\nport = 8001\n")
    settings = load_settings(cli={"config": "project/lemonade.toml"}, env={}, cwd=tmp_path)
    assert settings.data_dir == str(project / ".lemonade")


def test_data_dir_relative_to_the_file_that_sets_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "lemonade.toml").write_text('[server]\ndata_dir = "cache/here"\n')
    settings = load_settings(cli={"config": "project/lemonade.toml"}, env={}, cwd=tmp_path)
    assert settings.data_dir == str(project / "cache" / "here")
    assert settings.sources["data_dir"].startswith("file ")


def test_data_dir_from_env_and_cli_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    env_set = load_settings(env={"LEMONADE_DATA_DIR": "envdir"}, cwd=tmp_path)
    assert env_set.data_dir == str(tmp_path / "envdir")
    cli_set = load_settings(cli={"data_dir": "/abs/dir"}, env={"LEMONADE_DATA_DIR": "x"},
                            cwd=tmp_path)
    assert cli_set.data_dir == "/abs/dir"
    assert cli_set.sources["data_dir"] == "cli --data-dir"


def test_data_dir_rejects_an_empty_path(tmp_path: Path) -> None:
    (tmp_path / "lemonade.toml").write_text('[server]\ndata_dir = ""\n')
    with pytest.raises(ConfigError, match="data_dir: expected a directory path"):
        load_settings(env={}, cwd=tmp_path)


def test_max_queue_recipe_key(tmp_path: Path) -> None:
    base = '[models.tts1]\nrecipe = "synthetic"\n'
    assert load(tmp_path, base).models["tts1"].max_queue is None
    assert load(tmp_path, base + "max_queue = 0\n").models["tts1"].max_queue == 0
    for bad in ("-1", '"3"', "true", "1.5"):
        with pytest.raises(ConfigError, match="max_queue"):
            load(tmp_path, base + f"max_queue = {bad}\n")


# --- zygote_idle_timeout ---------------------------------------------------------------------


def test_zygote_idle_timeout_default_precedence_and_sources(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.zygote_idle_timeout_s == 600.0  # twice the shipped 5-minute model timer
    assert settings.sources["zygote_idle_timeout_s"] == "default"
    path = tmp_path / "lemonade.toml"
    settings = load(tmp_path, '[server]\nzygote_idle_timeout = "5m"\n')
    assert settings.zygote_idle_timeout_s == 300.0
    assert settings.sources["zygote_idle_timeout_s"] == f"file {path}"
    env = {"LEMONADE_ZYGOTE_IDLE_TIMEOUT": "90s"}
    settings = load(tmp_path, env=env)
    assert settings.zygote_idle_timeout_s == 90.0
    assert settings.sources["zygote_idle_timeout_s"] == "env LEMONADE_ZYGOTE_IDLE_TIMEOUT"
    settings = load(tmp_path, env=env, cli={"zygote_idle_timeout": "1h"})
    assert settings.zygote_idle_timeout_s == 3600.0
    assert settings.sources["zygote_idle_timeout_s"] == "cli --zygote-idle-timeout"
    assert load(tmp_path, cli={"zygote_idle_timeout": 300}).zygote_idle_timeout_s == 300.0


@pytest.mark.parametrize("value", ["0", "0.0", '"0s"', '"never"'])
def test_zygote_idle_timeout_zero_or_never_means_never(tmp_path: Path, value: str) -> None:
    settings = load(tmp_path, f"[server]\nzygote_idle_timeout = {value}\n")
    assert settings.zygote_idle_timeout_s == math.inf
    env = {"LEMONADE_ZYGOTE_IDLE_TIMEOUT": "0"}
    assert load(tmp_path, env=env).zygote_idle_timeout_s == math.inf
    assert load(tmp_path, cli={"zygote_idle_timeout": "never"}).zygote_idle_timeout_s == math.inf


def test_bad_zygote_idle_timeout_names_where_it_came_from(tmp_path: Path) -> None:
    message = error(tmp_path, env={"LEMONADE_ZYGOTE_IDLE_TIMEOUT": "-5"})
    assert message.startswith("env LEMONADE_ZYGOTE_IDLE_TIMEOUT:")
    assert "a duration" in message and '0/"never"' in message and "'-5'" in message
    message = error(tmp_path, cli={"zygote_idle_timeout": "soon"})
    assert message.startswith("--zygote-idle-timeout:") and "'soon'" in message


def test_the_serve_flag_reaches_the_config(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from supervisor.cli import main

    monkeypatch.chdir(tmp_path)  # no lemonade.toml here
    for name in [n for n in os.environ if n.startswith("LEMONADE_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(main, ["serve", "--zygote-idle-timeout", "soon"])
    assert result.exit_code != 0
    assert "--zygote-idle-timeout: expected" in result.output and "'soon'" in result.output
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--zygote-idle-timeout" in help_text and "LEMONADE_ZYGOTE_IDLE_TIMEOUT" in help_text
