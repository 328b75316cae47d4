"""Reading a recipe's option values inside a worker kind: one set of helpers for every kind.

The supervisor checks options against each kind's declared spec when the config loads
(``workers/options.py``); a kind still checks what it reads, because a worker can be started
with options that never went through a config file (tests, plugins, the wire). Every problem
is a ``bad_config`` error naming the kind, the option and what was wrong, which the manager
reports at once without the evict-and-retry a failed load gets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from workers.base import ModelError
from workers.protocol import ErrorCode


def bad_config(message: str) -> ModelError:
    return ModelError(ErrorCode.BAD_CONFIG, message)


def is_number(value: object) -> bool:
    """A finite int or float (``True`` is not a number here)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def int_option(kind: str, options: Mapping[str, Any], key: str, default: int, low: int,
               high: int) -> int:
    value = options.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise bad_config(f"{kind} option {key!r} must be an integer in {low}..{high}, "
                         f"got {value!r:.60}")
    return value


def optional_int_option(kind: str, options: Mapping[str, Any], key: str, low: int,
                        high: int) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise bad_config(f"{kind} option {key!r} must be an integer in {low}..{high}, "
                         f"got {value!r:.60}")
    return value


def number_option(kind: str, options: Mapping[str, Any], key: str, default: float, *,
                  low: float = 0.0) -> float:
    value = options.get(key, default)
    if not is_number(value) or value < low:
        raise bad_config(f"{kind} option {key!r} must be a number >= {low:g}, "
                         f"got {value!r:.60}")
    return float(value)
