"""Parsing of Kokoro voice names and blends, shared by the ``kokoro`` and ``kokoro-onnx`` kinds.

Kokoro-FastAPI taught users to blend voices with ``+`` (``af_bella+af_sky``) and to weight
them with a number in parentheses (``af_bella(2)+af_sky(1)``); both kinds accept the same
spelling so a client can switch between them. Names are checked against the voices the model
actually has, so a typo is a 400 that lists what exists rather than a failed file lookup.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from workers.base import ModelError, invalid

MAX_BLEND = 8
MAX_SPEC_CHARS = 256
_PART = re.compile(r"^\s*([A-Za-z0-9_\-]{1,64})\s*(?:\(\s*([0-9]*\.?[0-9]+)\s*\))?\s*$")


def parse_voice_spec(spec: str, known: Collection[str]) -> list[tuple[str, float]]:
    """``"af_bella(2)+af_sky"`` -> ``[("af_bella", 2/3), ("af_sky", 1/3)]``.

    Weights are normalised to sum to 1. Raises an ``invalid_request`` :class:`ModelError`
    whose message names the field (``voice``) and the problem.
    """
    if not spec.strip():
        raise invalid("voice must not be empty")
    if len(spec) > MAX_SPEC_CHARS:
        raise invalid(f"voice is longer than {MAX_SPEC_CHARS} characters")
    parts = spec.split("+")
    if len(parts) > MAX_BLEND:
        raise invalid(f"voice blends at most {MAX_BLEND} voices; got {len(parts)}")
    blend: list[tuple[str, float]] = []
    for part in parts:
        match = _PART.match(part)
        if match is None:
            raise invalid(
                f"voice {spec!r}: {part.strip()!r} is not a voice name or name(weight)"
            )
        name, weight_text = match.group(1), match.group(2)
        if name not in known:
            raise _unknown(name, known)
        weight = 1.0 if weight_text is None else float(weight_text)
        if weight <= 0:
            raise invalid(f"voice {spec!r}: the weight of {name} must be greater than 0")
        blend.append((name, weight))
    total = sum(w for _, w in blend)
    return [(name, w / total) for name, w in blend]


def _unknown(name: str, known: Collection[str]) -> ModelError:
    listing = sorted(known)
    shown = ", ".join(listing[:20]) + (f", ... ({len(listing)} in all)" if len(listing) > 20
                                       else "")
    return invalid(f"voice {name!r} is not one of this model's voices: {shown or '(none)'}")
