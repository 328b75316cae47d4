"""Tests for supervisor.units: every accepted spelling and every refusal."""

from __future__ import annotations

import math

import pytest

from supervisor.units import (
    format_bytes,
    format_duration,
    parse_duration,
    parse_keep_alive,
    parse_size,
)

WHERE = "lemonade.toml: [models.kokoro] idle_timeout"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (300, 300.0),
        (1.5, 1.5),
        ("300", 300.0),
        ("300s", 300.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2m30s", 150.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("1h0m5s", 3605.0),
        (" 5M ", 300.0),
        ("0.25", 0.25),
    ],
)
def test_parse_duration_accepts(value: object, expected: float) -> None:
    assert parse_duration(value, where=WHERE) == pytest.approx(expected)


@pytest.mark.parametrize("value", [0, 0.0, "0", "0s", "never", "NEVER", math.inf])
def test_parse_duration_zero_and_never_mean_never(value: object) -> None:
    assert parse_duration(value, where=WHERE) == math.inf


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-5m",
        "abc",
        "",
        "5x",
        "m",
        "1h30",
        "5 m",
        "1e3",
        "nan",
        "inf",
        True,
        False,
        math.nan,
        -math.inf,
        None,
        [5],
        "9" * 400 + "s",
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value, where=WHERE)
    message = str(info.value)
    assert message.startswith(WHERE + ":")
    assert '"5m"' in message and '"never"' in message
    assert repr(value) in message


def test_parse_duration_message_matches_documented_form() -> None:
    with pytest.raises(ValueError, match=r"""or 0/"never"; got 'abc'$"""):
        parse_duration("abc", where=WHERE)


def test_parse_duration_zero_is_zero_when_asked() -> None:
    assert parse_duration(0, where="w", zero_means_never=False) == 0.0
    assert parse_duration("0s", where="w", zero_means_never=False) == 0.0
    assert parse_duration("10s", where="w", zero_means_never=False) == 10.0
    for value in ("never", math.inf):
        with pytest.raises(ValueError, match=r"^w: ") as info:
            parse_duration(value, where="w", zero_means_never=False)
        assert '"never"' not in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        (300, 300.0),
        (2.5, 2.5),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        (-1, math.inf),
        (-0.5, math.inf),
        ("-1", math.inf),
        ("-1m", math.inf),
        ("never", math.inf),
    ],
)
def test_parse_keep_alive(value: object, expected: float) -> None:
    assert parse_keep_alive(value, where="keep_alive") == expected


@pytest.mark.parametrize(
    "value", [True, False, math.nan, math.inf, -math.inf, "abc", "", None, {}, "1e3"]
)
def test_parse_keep_alive_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^request keep_alive: expected") as info:
        parse_keep_alive(value, where="request keep_alive")
    assert '"5m"' in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        (1024.0, 1024),
        ("4096", 4096),
        ("100B", 100),
        ("1024KiB", 1024 * 1024),
        ("512MiB", 512 * 2**20),
        ("12GiB", 12 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2TiB", 2 * 2**40),
        ("1KB", 1000),
        ("800MB", 800_000_000),
        ("1GB", 1_000_000_000),
        ("1.1GB", 1_100_000_000),
        ("3TB", 3 * 10**12),
        ("1gib", 2**30),
        ("1GIB", 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("64mb", 64_000_000),
    ],
)
def test_parse_size_accepts(value: object, expected: int) -> None:
    assert parse_size(value, where="memory") == expected


@pytest.mark.parametrize(
    "value",
    [
        -1,
        "-1GiB",
        "abc",
        "",
        "12G",
        "12XB",
        "GiB",
        "auto",
        True,
        False,
        1.5,
        math.nan,
        math.inf,
        -2.0,
        None,
        ["1GiB"],
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value, where="x.toml: [models.a] memory")
    message = str(info.value)
    assert message.startswith("x.toml: [models.a] memory:")
    assert "MiB" in message and "GB" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "-"),
        (math.inf, "never"),
        (0, "0s"),
        (0.5, "0.5s"),
        (1, "1s"),
        (59.25, "59.25s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (3661, "1h1m1s"),
        (90000, "25h"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration(seconds: float | None, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("text", ["90s", "5m", "1h30m", "0.5s", "2m30s", "1h1m1s"])
def test_format_duration_round_trips(text: str) -> None:
    assert format_duration(parse_duration(text, where="w")) == text.replace("90s", "1m30s")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (None, "-"),
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1048575, "1.0 MiB"),
        (512 * 2**20, "512.0 MiB"),
        (1073741824, "1.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n: int | None, expected: str) -> None:
    assert format_bytes(n) == expected


def test_format_bytes_round_trips_through_parse_size() -> None:
    assert parse_size(format_bytes(3 * 2**29), where="w") == 3 * 2**29
