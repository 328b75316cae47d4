"""Strict JSON request bodies: every malformed or mistyped input becomes a 400 naming the field.

``json.loads`` alone accepts ``NaN``, duplicate keys and arbitrarily deep nesting; here those
are errors. Field accessors check type and bounds and say which field is wrong and what is
allowed, so a handler never sees a value it did not ask for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from supervisor.config import MODEL_NAME_RE
from supervisor.errors import BadRequest
from supervisor.units import parse_duration, parse_keep_alive

_MAX_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadRequest(f"request body has the key '{key}' twice")
        out[key] = value
    return out


def _depth(value: Any, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        raise BadRequest(f"request body is nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def parse_json_object(raw: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with too many digits
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, not {json_type(value)}")
    _depth(value)
    return value


async def read_body(request: web.Request, *, allow_empty: bool = False) -> Body:
    # The content type is not checked: `curl -d` sends form-encoded headers with JSON bodies.
    return Body(parse_json_object(await request.read(), allow_empty=allow_empty))


def json_type(value: Any) -> str:
    """How a message names a JSON value's type: "a string", "an array", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Body:
    """Typed, bounded access to the fields of one JSON object."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def string(
        self,
        name: str,
        *,
        required: bool = False,
        default: str | None = None,
        max_len: int = 256,
        allow_empty: bool = False,
    ) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise BadRequest(f"'{name}' is required", code="missing_field", param=name)
            return default
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string, not {json_type(value)}", param=name)
        if not allow_empty and not value.strip():
            raise BadRequest(f"'{name}' must not be empty", param=name)
        if len(value) > max_len:
            raise BadRequest(f"'{name}' is {len(value)} characters long; the limit is {max_len}",
                             param=name)
        return value

    def required_string(self, name: str, *, max_len: int = 256) -> str:
        value = self.string(name, required=True, max_len=max_len)
        assert value is not None
        return value

    def number(self, name: str, *, default: float, low: float, high: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'{name}' must be a number, not {json_type(value)}", param=name)
        if not math.isfinite(value) or not low <= value <= high:
            raise BadRequest(f"'{name}' must be between {low:g} and {high:g}, got {value}",
                             param=name)
        return float(value)

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false, not {json_type(value)}",
                             param=name)
        return value

    def choice(self, name: str, allowed: Sequence[str], *, default: str) -> str:
        value = self.string(name, default=default, max_len=64)
        assert value is not None
        if value not in allowed:
            raise BadRequest(
                f"'{name}' must be one of {', '.join(allowed)}; got '{value[:64]}'", param=name
            )
        return value

    def model_name(self, name: str = "model", *, required: bool = True) -> str | None:
        value = self.string(name, required=required, max_len=128)
        if value is not None and not MODEL_NAME_RE.match(value):
            raise BadRequest(
                f"'{name}' must be a model name (letters, digits and . _ : - only, "
                f"at most 128 characters)", param=name
            )
        return value

    def keep_alive(self) -> float | None:
        """Per-request idle timeout: ``keep_alive`` (Ollama semantics) or ``ttl`` (seconds)."""
        for name in ("keep_alive", "ttl"):
            value = self.data.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise BadRequest(f"'{name}' must be seconds or a duration like \"5m\"",
                                 param=name)
            try:
                return parse_keep_alive(value, where=name)
            except ValueError as e:
                raise BadRequest(str(e), param=name) from None
        return None

    def idle_timeout(self, name: str, *, required: bool) -> float | None:
        """A configured-style idle timeout: seconds or a duration; 0 or "never" = never."""
        value = self.data.get(name)
        if value is None:
            if required:
                raise BadRequest(f"'{name}' is required (seconds, a duration like \"5m\", "
                                 f"or 0 for never)", code="missing_field", param=name)
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise BadRequest(f"'{name}' must be seconds or a duration like \"5m\"",
                             param=name)
        try:
            return parse_duration(value, where=name)
        except ValueError as e:
            raise BadRequest(str(e), param=name) from None
