"""Durations and sizes as people write them, and back again.

Config files, environment variables, CLI flags and request bodies all carry idle timeouts
("5m", 300, "never") and memory sizes ("12GiB"). This module is the one place that turns
those spellings into seconds and bytes, with errors that say where the value came from and
what would have been accepted, and that turns numbers back into short human text for logs
and status output. It is pure: no I/O, no config knowledge.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = [
    "format_bytes",
    "format_duration",
    "parse_duration",
    "parse_keep_alive",
    "parse_size",
]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER_RE = re.compile(rf"[+-]?{_NUMBER}")
# "ms" must be tried before "m" so that "500ms" is not read as 500 minutes and a stray "s".
_DURATION_RE = re.compile(rf"([+-]?)((?:{_NUMBER}(?:ms|h|m|s))+)")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|h|m|s)")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE_RE = re.compile(rf"({_NUMBER})\s*([a-z]*)")
_BYTES_PER_UNIT = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_DURATION_FORMS = 'seconds (300) or a duration ("90s", "5m", "1h30m")'
_NEVER_FORMS = f'{_DURATION_FORMS}, or 0/"never"'
_KEEP_ALIVE_FORMS = f"{_DURATION_FORMS}; 0 unloads as soon as idle, a negative value never unloads"
_SIZE_FORMS = (
    'bytes (1073741824) or a size with a unit ("512MiB", "12GiB", "1GB"; '
    "units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)


def _signed_seconds(value: object) -> float | None:
    """Seconds (sign kept) from a number or a duration string; None if it is neither."""
    # bool is an int subclass, but `true` as a timeout is a mistake, not 1 second.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
        return None if math.isnan(seconds) else seconds
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if _PLAIN_NUMBER_RE.fullmatch(text):
        seconds = float(text)
    else:
        match = _DURATION_RE.fullmatch(text)
        if match is None:
            return None
        seconds = sum(
            float(number) * _SECONDS_PER_UNIT[unit]
            for number, unit in _DURATION_PART_RE.findall(match.group(2))
        )
        if match.group(1) == "-":
            seconds = -seconds
    # Absurdly long digit strings overflow to inf; that is garbage, not "never".
    return seconds if math.isfinite(seconds) else None


def _is_never(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == "never"


def parse_duration(value: object, *, where: str, zero_means_never: bool = True) -> float:
    """Seconds from a config value: 300, "300s", "5m", "1h30m", "500ms", "1.5s".

    With ``zero_means_never`` (the idle-timeout meaning), 0, "0", "never" and an infinite
    float give ``math.inf``. Without it, 0 is just zero and "never" is refused; use that for
    grace periods, timeouts and the like. Negative values, bools, NaN and anything else
    raise ``ValueError`` naming ``where`` and the accepted forms.
    """
    forms = _NEVER_FORMS if zero_means_never else _DURATION_FORMS
    if zero_means_never and _is_never(value):
        return math.inf
    seconds: float | None
    if isinstance(value, float) and math.isinf(value) and value > 0:
        seconds = math.inf
    else:
        seconds = _signed_seconds(value)
    if seconds is None or seconds < 0 or (math.isinf(seconds) and not zero_means_never):
        raise ValueError(f"{where}: expected {forms}; got {value!r}")
    if zero_means_never and seconds == 0:
        return math.inf
    return seconds


def parse_keep_alive(value: object, *, where: str) -> float:
    """Seconds from a per-request ``keep_alive``, with Ollama's meaning.

    0 means unload as soon as the model is idle (returns 0.0); any negative number or
    negative duration ("-1", "-1m") means never (``math.inf``), as does "never". Bools, NaN,
    infinities and non-numbers raise ``ValueError`` naming ``where``.
    """
    if _is_never(value):
        return math.inf
    seconds = _signed_seconds(value)
    if seconds is None or math.isinf(seconds):
        raise ValueError(f"{where}: expected {_KEEP_ALIVE_FORMS}; got {value!r}")
    if seconds < 0:
        return math.inf
    return seconds


def parse_size(value: object, *, where: str) -> int:
    """Bytes from an int or a size string: "512MiB", "1.5GiB", "1GB" (10**9), "100B".

    Units are case-insensitive; a bare number is bytes. Negative values, bools, fractions of
    a byte given as numbers, and anything else raise ``ValueError`` naming ``where``.
    """
    error = ValueError(f"{where}: expected {_SIZE_FORMS}; got {value!r}")
    if isinstance(value, bool):
        raise error
    if isinstance(value, int):
        if value < 0:
            raise error
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            raise error
        return int(value)
    if not isinstance(value, str):
        raise error
    match = _SIZE_RE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _BYTES_PER_UNIT:
        raise error
    # Decimal keeps "1.1GB" at exactly 1_100_000_000 where float arithmetic would not.
    return int(Decimal(match.group(1)) * _BYTES_PER_UNIT[match.group(2)])


def format_duration(seconds: float | None) -> str:
    """Short human text: inf -> "never", 0 -> "0s", 90 -> "1m30s", 0.5 -> "0.5s"."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return "never"
    sign = "-" if seconds < 0 else ""
    millis = round(abs(seconds) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if millis or not parts:
        parts.append(f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s")
    return sign + "".join(parts)


def format_bytes(n: int | None) -> str:
    """Short human text in binary units: None -> "-", 0 -> "0 B", 1536 -> "1.5 KiB"."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    size = abs(n)
    if size < 1024:
        return f"{sign}{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        # Compare the rounded value so 1048575 bytes reads "1.0 MiB", not "1024.0 KiB".
        if round(value, 1) < 1024 or unit == "PiB":
            break
    return f"{sign}{value:.1f} {unit}"
