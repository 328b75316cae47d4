"""The language the supervisor and its workers speak over a Unix socket.

Both sides import this module (it is the only arrow from ``supervisor`` into ``workers``), so
it holds everything they must agree on: the frame format, the decoding limits, one frozen
dataclass per message type, the error codes, and the kind names that ship with the project.

A frame is a 4-byte big-endian length followed by one msgpack map. The length is checked
against a maximum *before* the body is read, the body is unpacked with bounded container
sizes and no ext types, and the decoded map is checked against the message's exact schema.
Anything that breaks these rules raises :class:`ProtocolError`; the supervisor answers that
by killing the worker, the worker by exiting.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NoReturn

import msgpack

from workers.kinds import KINDS

PROTOCOL_VERSION = 1

#: Worker kinds that ship with the project: kind name -> the model type it serves by default
#: (``None``: the recipe must say, through ``type`` or ``options.type``).
BUILTIN_KINDS: Mapping[str, str | None] = {name: k.type for name, k in KINDS.items()}

MODEL_TYPES: tuple[str, ...] = ("llm", "tts", "asr", "embedding")

#: The call op the supervisor sends after a load when the recipe says ``warmup = true``.
#: A kind without a warmup answers ``unsupported``, which the supervisor accepts.
WARMUP_OP = "warmup"

#: Frames from a worker carry audio and embeddings; frames to a worker carry requests,
#: including a whole audio upload for transcription (up to 25 MB, OpenAI's limit).
MAX_WORKER_FRAME_BYTES = 16 * 1024 * 1024
MAX_SUPERVISOR_FRAME_BYTES = 32 * 1024 * 1024
#: A body that starts arriving must finish within this many seconds (slow-drip defence).
FRAME_BODY_DEADLINE_S = 30.0
#: Message schemas are shallow; anything nested deeper than this is hostile.
MAX_NESTING_DEPTH = 16
#: Arrays and maps in one frame, counted while decoding: an empty-container bomb (one byte
#: on the wire, ~60 bytes each in memory) is stopped long before it costs real memory.
MAX_CONTAINERS_PER_FRAME = 100_000
#: Error messages are truncated to this many characters before they travel further.
MAX_ERROR_MESSAGE_CHARS = 4096
_MAX_ID = 2**63

_HEADER_BYTES = 4


class ProtocolError(Exception):
    """A frame or message broke the protocol; the connection cannot be trusted any more."""


class ErrorCode:
    """Codes a worker puts in ``error`` messages; the supervisor maps them to HTTP statuses."""

    INVALID_REQUEST = "invalid_request"  # bad arguments from the client: 400
    UNSUPPORTED = "unsupported"  # the model cannot do this op/format: 400
    CANCELLED = "cancelled"  # answer to ``cancel``
    BAD_CONFIG = "bad_config"  # the recipe is wrong (missing file, bad option): no retry
    LOAD_FAILED = "load_failed"  # load failed for another reason: evict-and-retry applies
    OUT_OF_MEMORY = "out_of_memory"  # load or call ran out of memory
    INTERNAL = "internal"  # a bug or crash inside the model code: 502

    ALL: ClassVar[frozenset[str]] = frozenset(
        {
            INVALID_REQUEST,
            UNSUPPORTED,
            CANCELLED,
            BAD_CONFIG,
            LOAD_FAILED,
            OUT_OF_MEMORY,
            INTERNAL,
        }
    )


# --------------------------------------------------------------------------- field checks


def _fail(message: str) -> NoReturn:
    raise ProtocolError(message)


def _want_id(value: Any, t: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_ID:
        _fail(f"{t}: id must be an integer in [0, 2^63), got {value!r:.40}")
    return value


def _want_str(value: Any, t: str, key: str, *, max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        _fail(f"{t}: {key} must be a string of at most {max_len} characters")
    return value


def _want_map(value: Any, t: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(f"{t}: {key} must be a map")
    return value


def _want_memory(value: Any, t: str) -> dict[str, int]:
    memory = _want_map(value, t, "memory")
    out: dict[str, int] = {}
    for key in ("rss", "vram"):
        n = memory.get(key, 0)
        if type(n) is not int or n < 0 or n >= _MAX_ID:
            _fail(f"{t}: memory.{key} must be a non-negative integer")
        out[key] = n
    if set(memory) - {"rss", "vram"}:
        _fail(f"{t}: memory has unknown keys {sorted(set(memory) - {'rss', 'vram'})}")
    return out


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_NESTING_DEPTH:
        _fail(f"message nested deeper than {MAX_NESTING_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        _fail("non-finite float in message")


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """Base class: every message knows its wire type ``t``; its wire keys are ``t`` and its
    fields (``KEYS``, derived once per class below), so a field cannot be added to a message
    without reaching the wire and the decoder's exact-keys check."""

    T: ClassVar[str] = ""
    KEYS: ClassVar[frozenset[str]] = frozenset()
    #: Keys a sender may leave out (added to a message after its first version): an older
    #: peer that does not send them is still understood. Left out when None.
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset()

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"t": self.T}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL_KEYS:
                continue
            wire[f.name] = dict(value) if isinstance(value, dict) else value
        return wire

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Message:
        raise NotImplementedError


@dataclass(frozen=True)
class Hello(Message):
    """worker -> supervisor, first frame: who I am.

    ``token`` is sent only over TCP (a worker on a cluster node, supervisor/cluster/): there
    is no peer-pid check across machines, so the worker proves it is the one the supervisor
    started with the per-worker secret it was given. A Unix-socket worker leaves it out.
    """

    T: ClassVar[str] = "hello"
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset({"token"})
    v: int
    pid: int
    kind: str
    token: str | None = None

    def __repr__(self) -> str:  # never the secret in a log line or an error message
        return f"Hello(v={self.v}, pid={self.pid}, kind={self.kind!r}, token=" \
               f"{'<set>' if self.token else None})"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hello:
        if type(d["v"]) is not int or type(d["pid"]) is not int or d["pid"] <= 0:
            _fail("hello: v and pid must be positive integers")
        token = d.get("token")
        return cls(v=d["v"], pid=d["pid"], kind=_want_str(d["kind"], cls.T, "kind"),
                   token=None if token is None else _want_str(token, cls.T, "token"))


@dataclass(frozen=True)
class Load(Message):
    """supervisor -> worker: load this model."""

    T: ClassVar[str] = "load"
    id: int
    name: str
    type: str
    device: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Load:
        return cls(
            id=_want_id(d["id"], cls.T),
            name=_want_str(d["name"], cls.T, "name"),
            type=_want_str(d["type"], cls.T, "type"),
            device=_want_str(d["device"], cls.T, "device"),
            options=_want_map(d["options"], cls.T, "options"),
        )


@dataclass(frozen=True)
class Progress(Message):
    """worker -> supervisor while loading: ``fraction`` in [0, 1] and/or a short message
    (the phase), and, where the work is counted in bytes (a download, a conversion),
    ``done_bytes`` of ``total_bytes`` (``total_bytes`` null: not known).

    The byte counts were added after version 1 shipped; they are optional keys, sent only
    when known, so a worker that never sends them is still understood.
    """

    T: ClassVar[str] = "progress"
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset({"done_bytes", "total_bytes"})
    id: int
    fraction: float | None = None
    message: str = ""
    done_bytes: int | None = None
    total_bytes: int | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Progress:
        fraction = d["fraction"]
        if fraction is not None and (
            not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0
        ):
            _fail("progress: fraction must be null or a number in [0, 1]")
        done, total = d.get("done_bytes"), d.get("total_bytes")
        for key, value in (("done_bytes", done), ("total_bytes", total)):
            if value is not None and (type(value) is not int or not 0 <= value < _MAX_ID):
                _fail(f"progress: {key} must be null or a non-negative integer")
        if done is not None and total is not None and done > total:
            _fail(f"progress: done_bytes ({done}) is more than total_bytes ({total})")
        return cls(
            id=_want_id(d["id"], cls.T),
            fraction=None if fraction is None else float(fraction),
            message=_want_str(d["message"], cls.T, "message", max_len=MAX_ERROR_MESSAGE_CHARS),
            done_bytes=done,
            total_bytes=total,
        )


@dataclass(frozen=True)
class Loaded(Message):
    """worker -> supervisor: the model is ready on ``device``; memory measured after load."""

    T: ClassVar[str] = "loaded"
    id: int
    device: str
    memory: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Loaded:
        return cls(
            id=_want_id(d["id"], cls.T),
            device=_want_str(d["device"], cls.T, "device"),
            memory=_want_memory(d["memory"], cls.T),
            info=_want_map(d["info"], cls.T, "info"),
        )


@dataclass(frozen=True)
class Call(Message):
    """supervisor -> worker: run ``op`` with ``args``; answered by chunks then end or error."""

    T: ClassVar[str] = "call"
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Call:
        return cls(
            id=_want_id(d["id"], cls.T),
            op=_want_str(d["op"], cls.T, "op", max_len=64),
            args=_want_map(d["args"], cls.T, "args"),
        )


@dataclass(frozen=True)
class Chunk(Message):
    """worker -> supervisor: one piece of a streamed answer; ``seq`` counts from 0."""

    T: ClassVar[str] = "chunk"
    id: int
    seq: int
    data: Any

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Chunk:
        if type(d["seq"]) is not int or d["seq"] < 0:
            _fail("chunk: seq must be a non-negative integer")
        return cls(id=_want_id(d["id"], cls.T), seq=d["seq"], data=d["data"])


@dataclass(frozen=True)
class End(Message):
    """worker -> supervisor: the call finished; ``result`` is its (small) final value."""

    T: ClassVar[str] = "end"
    id: int
    result: Any = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> End:
        return cls(id=_want_id(d["id"], cls.T), result=d["result"])


@dataclass(frozen=True)
class Error(Message):
    """worker -> supervisor: a load or call failed (the worker itself stays up)."""

    T: ClassVar[str] = "error"
    id: int
    code: str
    message: str

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Error:
        code = _want_str(d["code"], cls.T, "code", max_len=64)
        if code not in ErrorCode.ALL:
            _fail(f"error: unknown code {code!r}")
        message = d["message"]
        if not isinstance(message, str):
            _fail("error: message must be a string")
        # Truncated rather than refused: a long traceback is not an attack.
        return cls(
            id=_want_id(d["id"], cls.T), code=code, message=message[:MAX_ERROR_MESSAGE_CHARS]
        )


@dataclass(frozen=True)
class Cancel(Message):
    """supervisor -> worker: the client went away; stop call ``id``."""

    T: ClassVar[str] = "cancel"
    id: int

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Cancel:
        return cls(id=_want_id(d["id"], cls.T))


@dataclass(frozen=True)
class Ping(Message):
    """supervisor -> worker: heartbeat; the answer carries fresh memory figures."""

    T: ClassVar[str] = "ping"
    id: int

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Ping:
        return cls(id=_want_id(d["id"], cls.T))


@dataclass(frozen=True)
class Pong(Message):
    """worker -> supervisor: answer to ``ping``."""

    T: ClassVar[str] = "pong"
    id: int
    memory: dict[str, int]

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Pong:
        return cls(id=_want_id(d["id"], cls.T), memory=_want_memory(d["memory"], cls.T))


@dataclass(frozen=True)
class Shutdown(Message):
    """supervisor -> worker: exit 0 now."""

    T: ClassVar[str] = "shutdown"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Shutdown:
        return cls()


for _message in (Hello, Load, Progress, Loaded, Call, Chunk, End, Error, Cancel, Ping, Pong,
                 Shutdown):
    _message.KEYS = frozenset({"t", *(f.name for f in fields(_message))})

#: What each side may receive. A worker never sends ``call``; a supervisor never sends ``end``.
FROM_WORKER: Mapping[str, type[Message]] = {
    m.T: m for m in (Hello, Progress, Loaded, Chunk, End, Error, Pong)
}
FROM_SUPERVISOR: Mapping[str, type[Message]] = {
    m.T: m for m in (Load, Call, Cancel, Ping, Shutdown)
}


# --------------------------------------------------------------------------- framing


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def encode(message: Message) -> bytes:
    """One frame: length prefix + msgpack body."""
    body: bytes = msgpack.packb(message.to_wire(), use_bin_type=True)
    return len(body).to_bytes(_HEADER_BYTES, "big") + body


class _ContainerBudget:
    """Counts containers as msgpack builds them and stops the decode past the budget."""

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS_PER_FRAME

    def spend(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ProtocolError(f"frame holds more than {MAX_CONTAINERS_PER_FRAME} arrays/maps")
        return container


def decode_body(body: bytes, allowed: Mapping[str, type[Message]]) -> Message:
    """Unpack one frame body with hard limits, then check it against its message schema."""
    limit = len(body)
    budget = _ContainerBudget()
    try:
        d = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            list_hook=budget.spend,
            object_hook=budget.spend,
            ext_hook=_reject_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=min(limit, 1_000_000),
            max_map_len=min(limit, 10_000),
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(d, dict):
        _fail(f"a frame must hold a map, got {type(d).__name__}")
    t = d.get("t")
    cls = allowed.get(t) if isinstance(t, str) else None
    if cls is None:
        _fail(f"unexpected message type {t!r:.40}")
    keys = set(d)
    if not cls.KEYS - cls.OPTIONAL_KEYS <= keys <= cls.KEYS:
        _fail(f"{t}: keys must be exactly {sorted(cls.KEYS)}"
              + (f" (optional: {sorted(cls.OPTIONAL_KEYS)})" if cls.OPTIONAL_KEYS else "")
              + f", got {sorted(map(str, d))[:20]}")
    _check_depth(d)
    return cls.from_wire(d)


async def read_message(
    reader: asyncio.StreamReader,
    allowed: Mapping[str, type[Message]],
    *,
    max_frame: int,
    body_deadline_s: float = FRAME_BODY_DEADLINE_S,
) -> Message | None:
    """Read one message; ``None`` on a clean EOF between frames.

    Waiting for a header has no deadline (an idle peer is fine); once a header arrived, the
    body must follow within ``body_deadline_s``.
    """
    try:
        header = await reader.readexactly(_HEADER_BYTES)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from None
    size = int.from_bytes(header, "big")
    if size == 0 or size > max_frame:
        _fail(f"frame length {size} is outside 1..{max_frame}")
    try:
        async with asyncio.timeout(body_deadline_s):  # no extra Task, unlike wait_for
            body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ProtocolError(f"connection closed inside a {size}-byte frame") from None
    except TimeoutError:
        raise ProtocolError(
            f"a {size}-byte frame did not arrive within {body_deadline_s}s"
        ) from None
    return decode_body(body, allowed)


class FrameSplitter:
    """Cuts a byte stream into messages, for a reader that takes whatever bytes have arrived.

    :func:`read_message` awaits each header and each body on its own; a busy reader (the
    supervisor's end of a worker socket) instead reads big blocks and takes every complete
    frame out of them at once. The rules are the same: a length outside ``1..max_frame``
    is refused as soon as the header is seen, before any body is kept, and every body goes
    through :func:`decode_body`. ``mid_frame`` says a frame has started and not finished,
    so the caller can hold the rest of it to a deadline (``frame_started_at``).
    """

    def __init__(self, allowed: Mapping[str, type[Message]], *, max_frame: int) -> None:
        self._allowed = allowed
        self._max_frame = max_frame
        self._buffer = bytearray()
        self.frame_started_at: float | None = None

    @property
    def mid_frame(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes, now: float) -> Iterator[Message]:
        """Add bytes; yields the messages they completed, in order. A bad frame raises
        ProtocolError after the good ones before it were yielded."""
        buffer = self._buffer
        if not buffer:
            self.frame_started_at = now
        buffer += data
        while len(buffer) >= _HEADER_BYTES:
            size = int.from_bytes(buffer[:_HEADER_BYTES], "big")
            if size == 0 or size > self._max_frame:
                _fail(f"frame length {size} is outside 1..{self._max_frame}")
            end = _HEADER_BYTES + size
            if len(buffer) < end:
                return
            body = bytes(buffer[_HEADER_BYTES:end])
            del buffer[:end]
            self.frame_started_at = now if buffer else None
            yield decode_body(body, self._allowed)

    def check_eof(self) -> None:
        """The peer closed the connection: fine between frames, a violation inside one."""
        if self._buffer:
            what = "header" if len(self._buffer) < _HEADER_BYTES else "frame"
            _fail(f"connection closed inside a {what}")

