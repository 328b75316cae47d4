"""Parsers for single config values: each checks one value and names where it came from.

Every parser takes ``(value, where, textual)``: ``where`` is the file and key, env var or CLI
flag to name in an error; ``textual`` is true for env vars and CLI flags, whose values arrive
as strings that must be converted, while values from a TOML file must already have the type.
``config`` strings these together into the settings tree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, NoReturn

from supervisor.units import parse_duration, parse_size

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A config value is missing, malformed or inconsistent.

    The message always names where the value came from (file and key, env var, or CLI flag)
    and what is allowed, so it can be shown to the user as it is.
    """


Parser = Callable[[Any, str, bool], Any]


def fail(where: str, expected: str, value: object) -> NoReturn:
    raise ConfigError(f"{where}: expected {expected}; got {value!r}")


def as_int(value: Any, where: str, textual: bool, expected: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if textual and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    fail(where, expected, value)


def as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        fail(where, "true or false", value)
    return value


def as_str(value: Any, where: str, expected: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        fail(where, expected, value)
    return value.strip()


def duration(*, zero_means_never: bool = False, positive: bool = False) -> Parser:
    def parse(value: Any, where: str, textual: bool) -> float:
        try:
            seconds = parse_duration(value, where=where, zero_means_never=zero_means_never)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if positive and seconds <= 0:
            fail(where, "a duration greater than 0", value)
        return seconds

    return parse


def parse_host(value: Any, where: str, textual: bool) -> str:
    expected = 'a host name or IP address ("127.0.0.1", "::1", "0.0.0.0")'
    host = as_str(value, where, expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host):
        fail(where, expected, value)
    return host


def parse_port(value: Any, where: str, textual: bool) -> int:
    expected = "an integer port 1..65535 (0 picks a free port)"
    port = as_int(value, where, textual, expected)
    if not 0 <= port <= 65535:
        fail(where, expected, value)
    return port


def parse_max_loaded(value: Any, where: str, textual: bool) -> int | None:
    expected = "an integer >= 1, or 0/-1 for unlimited"
    count = as_int(value, where, textual, expected)
    if count in (0, -1):
        return None
    if count < 1:
        fail(where, expected, value)
    return count


def parse_positive_int(value: Any, where: str, textual: bool) -> int:
    count = as_int(value, where, textual, "an integer >= 1")
    if count < 1:
        fail(where, "an integer >= 1", value)
    return count


def parse_budget(value: Any, where: str, textual: bool) -> int | Literal["auto"] | None:
    expected = '"auto" (device total), "none"/"off" (no budget), or a size ("12GiB", "800MB")'
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "auto":
            return "auto"
        if word in ("none", "off"):
            return None
    try:
        size = parse_size(value, where=where)
    except ValueError:
        fail(where, expected, value)
    if size == 0:
        fail(where, f'{expected}; a budget of 0 bytes fits nothing, use "none" instead', value)
    return size


def parse_model_name(value: Any, where: str, textual: bool) -> str:
    expected = f"a model name matching {MODEL_NAME_RE.pattern}"
    name = as_str(value, where, expected)
    if not MODEL_NAME_RE.match(name):
        fail(where, expected, value)
    return name


def parse_path(value: Any, where: str, textual: bool) -> str:
    expected = "a directory path"
    path = as_str(value, where, expected).strip()
    if not path or "\0" in path:
        fail(where, expected, value)
    return path


def parse_log_level(value: Any, where: str, textual: bool) -> str:
    expected = "one of " + ", ".join(LOG_LEVELS)
    level = as_str(value, where, expected).lower()
    if level not in LOG_LEVELS:
        fail(where, expected, value)
    return level


#: How workers start: ``off`` spawns a fresh interpreter every time; ``lazy`` forks them from a
#: per-kind template process (a zygote) started the first time a kind loads; ``eager`` starts
#: the zygote of every configured kind with the server.
ZYGOTE_MODES = ("off", "lazy", "eager")


def parse_zygotes(value: Any, where: str, textual: bool) -> str:
    expected = "one of " + ", ".join(ZYGOTE_MODES)
    mode = as_str(value, where, expected).strip().lower()
    if mode not in ZYGOTE_MODES:
        fail(where, expected, value)
    return mode


_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def parse_bool(value: Any, where: str, textual: bool) -> bool:
    """A TOML boolean, or one of the usual words in an env var (``LEMONADE_ACCESS_LOG=0``)."""
    if isinstance(value, bool):
        return value
    if textual and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        fail(where, "true or false (also 1/0, yes/no, on/off)", value)
    fail(where, "true or false", value)


def parse_preload(value: Any, where: str, textual: bool) -> tuple[str, ...]:
    if textual and isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        expected = "comma-separated model names" if textual else "an array of model names"
        fail(where, expected, value)
    names: list[str] = []
    for item in items:
        # On the command line and in env vars, "a,b" is as good as two separate names.
        parts = item.split(",") if textual and isinstance(item, str) else [item]
        for part in parts:
            if textual and isinstance(part, str) and not part.strip():
                continue
            name = parse_model_name(part, where, textual)
            if name not in names:
                names.append(name)
    return tuple(names)
