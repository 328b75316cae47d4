"""Recipe options as data: what a worker kind accepts, readable without importing the kind.

A recipe's ``[models.X.options]`` table is handed to the kind's ``load``. A typo there used to
be found only when the model was first used (a 503 and a cooldown); with a declared spec the
supervisor checks every recipe when the config loads and refuses to start, naming the file,
the model and the key. The same spec object is what the kind's ``load`` checks with (a worker
does not trust its caller), so there is one list of options, never two that drift apart.

A spec is plain data (name, accepted TOML types, allowed values or a numeric range, one line
of doc) and this module imports nothing heavy, so the supervisor can read every builtin
kind's spec (:mod:`workers.recipe_options`) without numpy, torch or onnxruntime. Checks here
are the cheap ones: a path that does not exist, a voice that is not installed or a model the
hub does not have is still the kind's own ``load`` to find.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.base import ModelError
from workers.protocol import ErrorCode

#: The TOML value types an option may accept. ``number`` is an integer or a float (finite);
#: ``integer`` never accepts a boolean (in Python ``True`` is an ``int``, in TOML it is not).
ValueType = Literal["string", "integer", "number", "boolean", "array", "table"]

_TYPE_WORDS: Mapping[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "an array",
    "table": "a table",
}


def _has_type(value: object, type_: str) -> bool:
    if type_ == "string":
        return isinstance(value, str)
    if type_ == "integer":
        return type(value) is int
    if type_ == "number":
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(float(value)))
    if type_ == "boolean":
        return isinstance(value, bool)
    if type_ == "array":
        return isinstance(value, list | tuple)
    if type_ == "table":
        return isinstance(value, Mapping)
    raise ValueError(f"unknown option type {type_!r}")


def _number_text(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Option:
    """One recipe option: its name, what values it takes, and one line saying what it does."""

    name: str
    types: tuple[ValueType, ...]
    doc: str
    #: The only values allowed, when the set is small and known without importing anything.
    choices: tuple[Any, ...] | None = None
    #: Inclusive bounds for ``integer`` and ``number`` values.
    low: float | None = None
    high: float | None = None
    #: A check of its own for what types and bounds cannot say (the entries of a table):
    #: returns what the value must be, as a phrase to follow "must be", or None when fine.
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.types:
            raise ValueError(f"option {self.name!r} accepts no type")
        for type_ in self.types:
            if type_ not in _TYPE_WORDS:
                raise ValueError(f"option {self.name!r}: unknown type {type_!r}")

    def expected(self) -> str:
        """What the option takes, in words: ``an integer in 1..256``, ``one of 'a', 'b'``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        words = " or ".join(_TYPE_WORDS[t] for t in self.types)
        if self.low is not None and self.high is not None:
            return f"{words} in {_number_text(self.low)}..{_number_text(self.high)}"
        if self.low is not None:
            return f"{words} >= {_number_text(self.low)}"
        if self.high is not None:
            return f"{words} <= {_number_text(self.high)}"
        return words

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not acceptable (a phrase to follow "must be"), or None."""
        matched = next((t for t in self.types if _has_type(value, t)), None)
        if matched is None:
            return self.expected()
        # bool == int in Python: True must not pass as a choice of 1.
        if self.choices is not None and not any(
                type(value) is type(c) and value == c for c in self.choices):
            return self.expected()
        if matched in ("integer", "number"):
            number = float(value)  # type: ignore[arg-type]  # checked numeric just above
            if (self.low is not None and number < self.low) or (
                    self.high is not None and number > self.high):
                return self.expected()
        if self.check is not None:
            return self.check(value)
        return None

    def suggestion(self, value: object) -> str:
        """`` (did you mean 'misaki'?)`` for a string close to one of the choices, else ""."""
        if self.choices is None or not isinstance(value, str):
            return ""
        close = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class OptionSpec:
    """Every option one worker kind accepts; anything else in a recipe is refused."""

    kind: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind}: an option is declared twice: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    def __getitem__(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(name)

    def problem(self, values: Mapping[str, Any]) -> str | None:
        """The first thing wrong with ``values``, as one sentence naming the key, or None.

        The sentence starts with the kind ("unknown hibari option 'voise' ..."), so the
        supervisor can put the file and the model in front of it and the worker can send it
        as it is.
        """
        allowed = self.names
        for key in values:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                listed = ", ".join(allowed) or "none"
                return f"unknown {self.kind} option {str(key)!r}{hint}; allowed: {listed}"
        for option in self.options:
            if option.name in values:
                value = values[option.name]
                wrong = option.problem(value)
                if wrong is not None:
                    return (f"{self.kind} option {option.name!r} must be {wrong}, "
                            f"got {value!r:.60}{option.suggestion(value)}")
        return None

    def check(self, values: Mapping[str, Any]) -> None:
        """Raise ``ModelError(bad_config)`` naming the first bad option (for ``load``)."""
        wrong = self.problem(values)
        if wrong is not None:
            raise ModelError(ErrorCode.BAD_CONFIG, wrong)

    def describe(self) -> str:
        """One line per option: name, what it takes, what it does (for docs and ``--help``)."""
        return "\n".join(f"{o.name}  ({o.expected()})  {o.doc}" for o in self.options)
