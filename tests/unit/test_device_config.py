"""Device budgets as written in the config file, the environment and flags: each bad value is
one clear error naming where it was written, and layers merge per device."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ConfigError
from tests.helpers import settings_from_toml

GiB = 1024**3
MODEL = '[models.m]\nrecipe = "synthetic"\ntype = "tts"\n'


def test_file_env_and_flag_layers_merge_per_device(tmp_path: Path) -> None:
    from supervisor.config import load_settings

    (tmp_path / "lemonade.toml").write_text(
        '[devices."cuda:0"]\nmemory = "16GiB"\nheadroom = "1GiB"\n' + MODEL)
    settings = load_settings(cli={"device_budget": ["cuda:1=8GiB"]},
                             env={"LEMONADE_DEVICE_BUDGETS": "cuda:0=12GiB,npu=4GiB"},
                             cwd=tmp_path)
    assert {n: d.memory for n, d in settings.devices.items()} == {
        "cuda:0": 12 * GiB, "cuda:1": 8 * GiB, "npu": 4 * GiB}
    assert settings.devices["cuda:0"].headroom_bytes == GiB  # the file's headroom is kept


@pytest.mark.parametrize(("table", "named"), [
    ('[devices."cuda:0"]\nmemory = "-1GiB"\n', 'memory'),
    ('[devices."cuda:0"]\nmemory = "lots"\n', 'memory'),
    ('[devices."cuda:0"]\nmemory = 0\n', 'memory'),
    ('[devices."cuda:0"]\nheadroom = "x"\n', 'headroom'),
    ('[devices."cuda:0"]\nvram = "1GiB"\n', "unknown key 'vram'"),
    ('[devices."gpu0"]\nmemory = "1GiB"\n', 'gpu0'),
    ('[devices.cpu]\nmemory = "1GiB"\n', 'memory_budget'),
])
def test_bad_device_tables_name_the_file_device_and_key(
        tmp_path: Path, table: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_toml(tmp_path, table + MODEL)
    message = str(caught.value)
    assert "lemonade.toml" in message and "[devices" in message and named in message


@pytest.mark.parametrize("value", ["cuda:0", "cuda:0=abc", "cuda:0=1GiB,cuda:0=2GiB", "cpu=1GiB"])
def test_bad_env_budgets_name_the_variable(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_toml(tmp_path, MODEL, env={"LEMONADE_DEVICE_BUDGETS": value})
    assert "LEMONADE_DEVICE_BUDGETS" in str(caught.value)


@pytest.mark.parametrize(("line", "named"), [
    ('vram = "lots"', "vram"),
    ('fallback = "gpu"', "fallback"),
    ('device = "cuda:0"\nfallback = "cpu"', "fallback"),
    ('device = "tpu"', "device"),
])
def test_bad_recipe_device_keys(tmp_path: Path, line: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_toml(tmp_path, MODEL + line + "\n")
    assert "[models.m]" in str(caught.value) and named in str(caught.value)
