"""The wire protocol: every message survives a round trip, and every broken frame is refused.

Both sides trust ``workers.protocol`` to turn hostile or corrupt bytes into ``ProtocolError``
(never a crash, a hang or a huge allocation), so each rule in its docstring has a test here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgpack
import pytest

from workers.protocol import (
    FROM_SUPERVISOR,
    FROM_WORKER,
    MAX_CONTAINERS_PER_FRAME,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_NESTING_DEPTH,
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Chunk,
    End,
    Error,
    ErrorCode,
    FrameSplitter,
    Hello,
    Load,
    Loaded,
    Message,
    Ping,
    Pong,
    Progress,
    ProtocolError,
    Shutdown,
    decode_body,
    encode,
    read_message,
)

ANY_DIRECTION: Mapping[str, type[Message]] = {**FROM_WORKER, **FROM_SUPERVISOR}


def body_of(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)  # type: ignore[no-any-return]


def frame_of(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def reader_with(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# --------------------------------------------------------------------------- round trips

WORKER_MESSAGES: list[Message] = [
    Hello(v=PROTOCOL_VERSION, pid=4312, kind="synthetic"),
    Progress(id=1, fraction=0.5, message="loading"),
    Progress(id=1, fraction=None, message=""),
    Progress(id=1, fraction=0.25, message="downloading", done_bytes=5, total_bytes=20),
    Progress(id=1, fraction=None, message="reading", done_bytes=2**40),
    Loaded(id=1, device="cpu", memory={"rss": 10, "vram": 0}, info={"sample_rate": 24000}),
    Chunk(id=7, seq=0, data=b"\x00\x01\xff"),
    Chunk(id=7, seq=3, data={"text": "hi", "n": [1, 2.5]}),
    End(id=7, result={"samples": 4800, "format": "wav"}),
    End(id=8, result=None),
    Error(id=9, code=ErrorCode.INVALID_REQUEST, message="unknown voice 'x'"),
    Pong(id=2**63 - 1, memory={"rss": 123456, "vram": 789}),
]
SUPERVISOR_MESSAGES: list[Message] = [
    Load(id=1, name="kokoro", type="tts", device="auto", options={"memory_mb": 64}),
    Call(id=7, op="speech", args={"input": "hello", "speed": 1.25}),
    Cancel(id=7),
    Ping(id=0),
    Shutdown(),
]


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=lambda m: m.T)
def test_worker_messages_round_trip(message: Message) -> None:
    frame = encode(message)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_body(frame[4:], FROM_WORKER) == message


@pytest.mark.parametrize("message", SUPERVISOR_MESSAGES, ids=lambda m: m.T)
def test_supervisor_messages_round_trip(message: Message) -> None:
    frame = encode(message)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_body(frame[4:], FROM_SUPERVISOR) == message


def test_every_message_type_is_covered() -> None:
    covered = {m.T for m in WORKER_MESSAGES + SUPERVISOR_MESSAGES}
    assert covered == set(ANY_DIRECTION)


def test_each_side_accepts_only_its_own_messages() -> None:
    with pytest.raises(ProtocolError, match="unexpected message type"):
        decode_body(encode(Call(id=1, op="speech", args={}))[4:], FROM_WORKER)
    with pytest.raises(ProtocolError, match="unexpected message type"):
        decode_body(encode(End(id=1, result=None))[4:], FROM_SUPERVISOR)


# --------------------------------------------------------------------------- rejections


def rejects(d_or_body: Any, allowed: Mapping[str, type[Message]] = ANY_DIRECTION) -> str:
    body = d_or_body if isinstance(d_or_body, bytes) else body_of(d_or_body)
    with pytest.raises(ProtocolError) as info:
        decode_body(body, allowed)
    return str(info.value)


@pytest.mark.parametrize("value", [[1, 2], "ping", 5, None, b"\x81"])
def test_non_map_frame(value: Any) -> None:
    assert "must hold a map" in rejects(body_of(value))


@pytest.mark.parametrize("t", ["nope", "", 3, None, "Ping"])
def test_unknown_type(t: Any) -> None:
    assert "unexpected message type" in rejects({"t": t, "id": 1})


def test_missing_type() -> None:
    assert "unexpected message type" in rejects({"id": 1})


def test_missing_key() -> None:
    assert "keys must be exactly" in rejects({"t": "ping"})
    assert "keys must be exactly" in rejects({"t": "error", "id": 1, "code": "internal"})


def test_extra_key() -> None:
    assert "keys must be exactly" in rejects({"t": "ping", "id": 1, "extra": 2})
    assert "keys must be exactly" in rejects({"t": "shutdown", "id": 1})


@pytest.mark.parametrize("bad_id", [-1, True, False, 2**63, 2**64 - 1, 1.0, "1", None])
def test_bad_ids(bad_id: Any) -> None:
    assert "id must be an integer" in rejects({"t": "ping", "id": bad_id})
    assert "id must be an integer" in rejects({"t": "cancel", "id": bad_id})


def test_largest_id_is_accepted() -> None:
    assert decode_body(body_of({"t": "ping", "id": 2**63 - 1}), FROM_SUPERVISOR) == Ping(2**63 - 1)


def test_non_string_map_keys() -> None:
    rejects(body_of({"t": "ping", "id": 1, 5: 1}))
    rejects(body_of({"t": "call", "id": 1, "op": "speech", "args": {1: "x"}}))


END_PREFIX = b"\x83\xa1t\xa3end\xa2id\x01\xa6result"  # {"t": "end", "id": 1, "result": ...


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(5, b""),
        msgpack.ExtType(5, b"payload"),
        msgpack.Timestamp(1_700_000_000, 0),
        msgpack.Timestamp(1_700_000_000, 5),
        msgpack.Timestamp(2**40, 0),
    ],
    ids=["ext-empty", "ext-5", "timestamp32", "timestamp64", "timestamp96"],
)
def test_ext_types_are_refused(ext: Any) -> None:
    assert "ext" in rejects({"t": "end", "id": 1, "result": ext})
    assert "ext" in rejects({"t": "call", "id": 1, "op": "speech", "args": {"when": ext}})


@pytest.mark.parametrize(
    "raw",
    [b"\xd4\xff\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x00\x05", b"\xc9\xff\xff\xff\xff\x01"],
    ids=["fixext1-minus-1", "timestamp-fixext4", "ext8-empty", "ext32-huge-claim"],
)
def test_raw_ext_encodings_are_refused(raw: bytes) -> None:
    assert "ext" in rejects(END_PREFIX + raw)


def test_invalid_utf8_string() -> None:
    rejects(END_PREFIX + b"\xa2\xff\xfe")


def test_reserved_byte_c1() -> None:
    rejects(END_PREFIX + b"\xc1")
    rejects(b"\xc1")


def test_trailing_bytes() -> None:
    rejects(body_of({"t": "ping", "id": 1}) + b"\x00")


def test_truncated_body() -> None:
    rejects(body_of({"t": "ping", "id": 1})[:-1])


def test_container_length_claims_beyond_the_body() -> None:
    # A 5-byte body that claims 2^31 elements must not allocate anything.
    rejects(b"\xdd" + (2**31).to_bytes(4, "big"))
    rejects(b"\xdf" + (2**31).to_bytes(4, "big"))


def test_empty_container_bomb_map() -> None:
    # 10 001 entries of 2 bytes each: a map larger than the per-map limit.
    count = 10_001
    entries = b"".join(body_of(f"k{i}") + b"\x80" for i in range(count))
    rejects(b"\xdf" + count.to_bytes(4, "big") + entries)


def test_empty_container_bomb_array() -> None:
    # One byte per empty array: a million and one of them in a single array.
    count = 1_000_001
    body = b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count
    rejects(body)
    rejects(END_PREFIX + body)


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_deeper_than_limit() -> None:
    assert "nested deeper" in rejects({"t": "end", "id": 1, "result": nested(MAX_NESTING_DEPTH)})
    deep_map: Any = 1
    for _ in range(MAX_NESTING_DEPTH):
        deep_map = {"x": deep_map}
    assert "nested deeper" in rejects({"t": "call", "id": 1, "op": "x", "args": deep_map})


def test_nesting_at_the_limit_is_accepted() -> None:
    result = nested(MAX_NESTING_DEPTH - 1)
    assert decode_body(body_of({"t": "end", "id": 1, "result": result}), FROM_WORKER) == End(
        id=1, result=result
    )


def test_very_deep_nesting_does_not_crash() -> None:
    rejects(b"\x91" * 100_000 + b"\x00")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats(value: float) -> None:
    assert "non-finite" in rejects({"t": "end", "id": 1, "result": {"x": [value]}})
    rejects({"t": "progress", "id": 1, "fraction": value, "message": ""})


def test_progress_fraction_out_of_range() -> None:
    rejects({"t": "progress", "id": 1, "fraction": 1.5, "message": ""})
    rejects({"t": "progress", "id": 1, "fraction": "half", "message": ""})


def test_progress_without_byte_counts_is_understood_and_sent_without_them() -> None:
    # A worker from before byte counts existed sends exactly the first version's keys.
    old = {"t": "progress", "id": 1, "fraction": 0.5, "message": "loading"}
    assert decode_body(body_of(old), FROM_WORKER) == Progress(id=1, fraction=0.5,
                                                              message="loading")
    assert Progress(id=1, fraction=0.5, message="loading").to_wire() == old


@pytest.mark.parametrize(("extra", "problem"), [
    ({"done_bytes": -1}, "done_bytes must be null or a non-negative integer"),
    ({"total_bytes": 1.5}, "total_bytes must be null or a non-negative integer"),
    ({"done_bytes": True}, "done_bytes must be null or a non-negative integer"),
    ({"done_bytes": 2**63}, "done_bytes must be null or a non-negative integer"),
    ({"done_bytes": 11, "total_bytes": 10}, "is more than total_bytes"),
    ({"bytes": 1}, "keys must be exactly"),
])
def test_progress_byte_counts_are_checked(extra: dict[str, Any], problem: str) -> None:
    base = {"t": "progress", "id": 1, "fraction": None, "message": ""}
    assert problem in rejects({**base, **extra})


def test_the_required_keys_of_progress_are_still_required() -> None:
    assert "keys must be exactly" in rejects({"t": "progress", "id": 1, "fraction": None,
                                              "done_bytes": 1})


def test_error_message_is_truncated() -> None:
    long = "x" * (MAX_ERROR_MESSAGE_CHARS * 3)
    message = decode_body(
        body_of({"t": "error", "id": 1, "code": "internal", "message": long}), FROM_WORKER
    )
    assert isinstance(message, Error)
    assert message.message == "x" * MAX_ERROR_MESSAGE_CHARS


def test_unknown_error_code() -> None:
    assert "unknown code" in rejects(
        {"t": "error", "id": 1, "code": "teapot", "message": "short and stout"}
    )


def test_bad_memory_maps() -> None:
    rejects({"t": "pong", "id": 1, "memory": {"rss": -1, "vram": 0}})
    rejects({"t": "pong", "id": 1, "memory": {"rss": 1, "vram": 0, "swap": 3}})
    rejects({"t": "pong", "id": 1, "memory": {"rss": True, "vram": 0}})
    rejects({"t": "pong", "id": 1, "memory": [1, 2]})


def test_bad_field_types() -> None:
    rejects({"t": "hello", "v": 1, "pid": 0, "kind": "synthetic"})
    rejects({"t": "hello", "v": 1, "pid": 12, "kind": 7})
    rejects({"t": "call", "id": 1, "op": "speech", "args": [1]})
    rejects({"t": "call", "id": 1, "op": "x" * 65, "args": {}})
    rejects({"t": "chunk", "id": 1, "seq": -1, "data": b""})
    rejects({"t": "load", "id": 1, "name": "m", "type": "tts", "device": "cpu", "options": 3})


# --------------------------------------------------------------------------- read_message


async def test_read_message_reads_consecutive_frames_then_clean_eof() -> None:
    reader = reader_with(encode(Ping(1)) + encode(Cancel(2)))
    assert await read_message(reader, FROM_SUPERVISOR, max_frame=1024) == Ping(1)
    assert await read_message(reader, FROM_SUPERVISOR, max_frame=1024) == Cancel(2)
    assert await read_message(reader, FROM_SUPERVISOR, max_frame=1024) is None


async def test_clean_eof_is_none() -> None:
    assert await read_message(reader_with(b""), FROM_SUPERVISOR, max_frame=1024) is None


async def test_zero_length_frame() -> None:
    with pytest.raises(ProtocolError, match="outside"):
        await read_message(reader_with(b"\x00\x00\x00\x00"), FROM_SUPERVISOR, max_frame=1024)


async def test_oversized_length_is_refused_without_reading_the_body() -> None:
    # No EOF and no body: a reader that waited for the body would hang here.
    reader = reader_with((1025).to_bytes(4, "big") + b"xyz", eof=False)
    with pytest.raises(ProtocolError, match="outside"):
        await asyncio.wait_for(read_message(reader, FROM_SUPERVISOR, max_frame=1024), 1.0)
    assert await reader.readexactly(3) == b"xyz"  # the body was left alone


async def test_huge_length_is_refused() -> None:
    reader = reader_with(b"\xff\xff\xff\xff", eof=False)
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(read_message(reader, FROM_SUPERVISOR, max_frame=1024), 1.0)


@pytest.mark.parametrize("cut", [1, 2, 3])
async def test_truncated_header_then_eof(cut: int) -> None:
    with pytest.raises(ProtocolError, match="header"):
        await read_message(reader_with(encode(Ping(1))[:cut]), FROM_SUPERVISOR, max_frame=1024)


async def test_truncated_body_then_eof() -> None:
    frame = encode(Call(id=1, op="speech", args={"input": "hello"}))
    for cut in (4, 5, len(frame) - 1):
        with pytest.raises(ProtocolError, match="closed inside"):
            await read_message(reader_with(frame[:cut]), FROM_SUPERVISOR, max_frame=1024)


async def test_trickled_body_past_the_deadline() -> None:
    frame = encode(Call(id=1, op="speech", args={"input": "hello"}))
    reader = reader_with(frame[:6], eof=False)
    loop = asyncio.get_running_loop()
    # One more byte arrives in time, the rest never does.
    loop.call_later(0.02, reader.feed_data, frame[6:7])
    with pytest.raises(ProtocolError, match="did not arrive"):
        await asyncio.wait_for(
            read_message(reader, FROM_SUPERVISOR, max_frame=1024, body_deadline_s=0.1), 2.0
        )


async def test_idle_peer_has_no_header_deadline() -> None:
    reader = reader_with(b"", eof=False)
    task = asyncio.ensure_future(
        read_message(reader, FROM_SUPERVISOR, max_frame=1024, body_deadline_s=0.01)
    )
    await asyncio.sleep(0.1)
    assert not task.done()
    reader.feed_data(encode(Ping(5)))
    assert await asyncio.wait_for(task, 1.0) == Ping(5)


async def test_garbage_body_through_the_reader() -> None:
    reader = reader_with(frame_of(b"\xc1\xc1\xc1"))
    with pytest.raises(ProtocolError):
        await read_message(reader, FROM_SUPERVISOR, max_frame=1024)


def test_an_empty_container_bomb_is_stopped_while_decoding() -> None:
    """200k empty arrays are 200 kB on the wire but ~12 MB in memory; a 16 MiB frame of them
    would cost about 1 GB. The decoder stops at its container budget instead."""
    body = msgpack.packb({"t": "end", "id": 1, "result": [[]] * (MAX_CONTAINERS_PER_FRAME + 1)})
    with pytest.raises(ProtocolError, match="arrays/maps"):
        decode_body(body, FROM_WORKER)


def test_a_frame_within_the_container_budget_decodes() -> None:
    rows = [[0.5] * 8 for _ in range(1000)]  # e.g. a batch of embeddings
    body = msgpack.packb({"t": "end", "id": 1, "result": rows})
    message = decode_body(body, FROM_WORKER)
    assert isinstance(message, End) and message.result == rows


# ----------------------------------------------------------------------------- FrameSplitter


def _splitter() -> FrameSplitter:
    return FrameSplitter(FROM_WORKER, max_frame=1024)


def test_frames_split_anywhere_come_out_whole_and_in_order() -> None:
    stream = b"".join(encode(Chunk(id=1, seq=i, data=bytes([i]) * 50)) for i in range(3))
    stream += encode(End(id=1, result={"ok": True}))
    for cut in (1, 3, 4, 5, 57, len(stream) - 1):
        splitter = _splitter()
        got = list(splitter.feed(stream[:cut], now=1.0))
        assert splitter.mid_frame and splitter.frame_started_at == 1.0
        got += list(splitter.feed(stream[cut:], now=2.0))
        assert not splitter.mid_frame and splitter.frame_started_at is None
        assert [m.T for m in got] == ["chunk", "chunk", "chunk", "end"], cut
        assert [m.data for m in got[:3]] == [b"\x00" * 50, b"\x01" * 50, b"\x02" * 50]


def test_an_oversized_length_is_refused_before_its_body_arrives() -> None:
    splitter = _splitter()
    with pytest.raises(ProtocolError, match=r"outside 1\.\.1024"):
        list(splitter.feed(b"\x00\x00\x04\x01", now=0.0))


def test_good_frames_before_a_bad_one_are_still_delivered() -> None:
    good = encode(Chunk(id=1, seq=0, data=b"audio"))
    garbage = b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1"
    messages = _splitter().feed(good + garbage, now=0.0)
    assert next(messages).data == b"audio"
    with pytest.raises(ProtocolError):
        next(messages)


def test_a_close_inside_a_frame_is_a_violation_and_between_frames_is_not() -> None:
    splitter = _splitter()
    list(splitter.feed(encode(End(id=1, result=None)), now=0.0))
    splitter.check_eof()  # clean
    list(splitter.feed(b"\x00\x00\x03\xe8" + b"\x81" * 10, now=0.0))
    with pytest.raises(ProtocolError, match="inside a frame"):
        splitter.check_eof()
