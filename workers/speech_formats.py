"""What a speech request may ask for, per worker kind: one table the routes and the kinds read.

``POST /v1/audio/speech`` is checked twice: by the route, before any model is loaded (a format
the model's kind cannot produce must be a fast 400, not a load followed by a failure), and by
the worker, which never trusts its caller. Both read this module, so the two checks cannot
disagree. It imports only the standard library: the supervisor reads it without numpy,
soundfile or torch.

Per kind: the formats it can produce, which of them can go out piece by piece while the text
is still being spoken (the others are sent whole at the end of a stream), and the format a
request that names none gets. OpenAI's default is ``mp3``; a kind that cannot encode mp3 (the
synthetic kind writes its tone by hand: ``wav`` and ``pcm`` only) defaults to ``wav``. A kind
not listed here (a plugin) is held to the union of the known formats and defaults to ``wav``,
what every kind can write; its own worker has the last word.

OpenAI also names ``aac``; no kind here produces it, so it is refused everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: OpenAI's limit on ``input`` (characters), and the range of ``speed``.
MAX_INPUT_CHARS = 4096
MIN_SPEED, MAX_SPEED = 0.25, 4.0

#: Every format OpenAI's speech API names (``aac`` included: it is refused, with a reason).
OPENAI_FORMATS: tuple[str, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")
#: The formats ``workers.audio`` encodes (the Kokoro and hibari kinds).
ENCODED_FORMATS: tuple[str, ...] = ("wav", "pcm", "flac", "mp3", "opus")
#: Formats whose bytes can be sent sentence by sentence (flac and mp3 need the whole file).
PROGRESSIVE_FORMATS: frozenset[str] = frozenset({"wav", "pcm", "opus"})
#: The ``Content-Type`` of each format's bytes.
CONTENT_TYPES: Mapping[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
#: OpenAI's ``stream_format`` values: raw audio bytes, or server-sent events with base64 audio.
STREAM_FORMATS: tuple[str, ...] = ("audio", "sse")


@dataclass(frozen=True)
class KindFormats:
    """The speech formats of one worker kind."""

    formats: tuple[str, ...]
    default: str

    def __post_init__(self) -> None:
        if self.default not in self.formats:
            raise ValueError(f"default format {self.default!r} is not one of {self.formats}")

    def streams_progressively(self, fmt: str) -> bool:
        return fmt in PROGRESSIVE_FORMATS

    def problem(self, fmt: str, kind: str) -> str | None:
        """Why ``fmt`` cannot be asked of this kind (a sentence naming the field), or None."""
        if fmt in self.formats:
            return None
        allowed = ", ".join(self.formats)
        if fmt == "aac":
            return (f"'response_format' aac is not produced by this server; "
                    f"{kind} models produce: {allowed}")
        if fmt in OPENAI_FORMATS or fmt in CONTENT_TYPES:
            return f"'response_format' {fmt} is not produced by {kind} models; allowed: {allowed}"
        return f"'response_format' must be one of {allowed}; got {fmt[:40]!r}"


_ENCODING_KIND = KindFormats(ENCODED_FORMATS, "mp3")
#: Built-in speech kinds.
KINDS: Mapping[str, KindFormats] = {
    "kokoro": _ENCODING_KIND,
    "kokoro-onnx": _ENCODING_KIND,
    "hibari": _ENCODING_KIND,
    "synthetic": KindFormats(("wav", "pcm"), "wav"),
}
#: A kind not in :data:`KINDS` (a plugin): any format some kind produces, ``wav`` by default.
UNKNOWN_KIND = KindFormats(ENCODED_FORMATS, "wav")
#: Every format at least one kind can produce (what the route accepts at all).
ALL_FORMATS: tuple[str, ...] = tuple(
    f for f in OPENAI_FORMATS if any(f in k.formats for k in (*KINDS.values(), UNKNOWN_KIND)))


def for_kind(kind: str) -> KindFormats:
    """The formats of ``kind`` (:data:`UNKNOWN_KIND` for one this table does not list)."""
    return KINDS.get(kind, UNKNOWN_KIND)
