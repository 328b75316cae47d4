"""The worker side of the protocol, against real ``python -m workers`` processes.

Each test plays the supervisor: it listens on a Unix socket in a private 0700 directory,
spawns a worker of the ``synthetic`` kind in its own session, accepts its connection and
speaks ``workers.protocol`` to it. Every worker is killed and reaped before its test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from workers.protocol import (
    FROM_WORKER,
    MAX_WORKER_FRAME_BYTES,
    PROTOCOL_VERSION,
    Call,
    Cancel,
    Chunk,
    End,
    Error,
    ErrorCode,
    Hello,
    Load,
    Loaded,
    Message,
    Ping,
    Pong,
    Progress,
    Shutdown,
    encode,
    read_message,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10.0
MIB = 1024 * 1024
PAGE_NOISE = MIB // 2


class Worker:
    """A spawned worker and the supervisor's end of its socket."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer

    async def send(self, message: Message) -> None:
        await self.send_raw(encode(message))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, within_s: float = TIMEOUT_S) -> Message | None:
        return await asyncio.wait_for(
            read_message(self.reader, FROM_WORKER, max_frame=MAX_WORKER_FRAME_BYTES), within_s
        )

    async def expect(self, cls: type[Message], within_s: float = TIMEOUT_S) -> Any:
        """The next message that is not load progress; it must be a ``cls``."""
        while True:
            message = await self.recv(within_s)
            if not isinstance(message, Progress) or cls is Progress:
                break
        assert isinstance(message, cls), f"expected {cls.T}, got {message!r}"
        return message

    async def load(self, **options: Any) -> Message:
        await self.send(Load(id=1, name="synth", type="tts", device="cpu", options=options))
        while True:
            message = await self.recv()
            if not isinstance(message, Progress):
                assert message is not None, "worker closed the connection during load"
                return message

    async def loaded(self, **options: Any) -> Loaded:
        message = await self.load(**options)
        assert isinstance(message, Loaded), message
        return message

    async def call(self, request_id: int, **args: Any) -> tuple[list[Chunk], Message]:
        """Run one call alone; its chunks and its terminal frame."""
        await self.send(Call(id=request_id, op="speech", args=args))
        chunks: list[Chunk] = []
        while True:
            message = await self.recv()
            assert message is not None and getattr(message, "id", None) == request_id, message
            if isinstance(message, Chunk):
                chunks.append(message)
            else:
                return chunks, message

    async def exit_code(self, within_s: float = TIMEOUT_S) -> int:
        return await asyncio.wait_for(self.proc.wait(), within_s)

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)


@contextlib.asynccontextmanager
async def spawn_worker(kind: str = "synthetic", *extra: str) -> AsyncIterator[Worker]:
    """Spawn a worker and accept its connection; kill and reap it on the way out."""
    runtime_dir = tempfile.mkdtemp(prefix="lw-", dir="/tmp")
    os.chmod(runtime_dir, 0o700)
    path = os.path.join(runtime_dir, "w.sock")
    connected: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connected.put((reader, writer))

    server = await asyncio.start_unix_server(on_connect, path)
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers",
            "--socket",
            path,
            "--kind",
            kind,
            "--parent-pid",
            str(os.getpid()),
            *extra,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        reader, connection = await asyncio.wait_for(connected.get(), TIMEOUT_S)
        writer = connection
        yield Worker(proc, reader, connection)
    finally:
        if writer is not None:
            writer.close()
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        server.close()
        await server.wait_closed()
        shutil.rmtree(runtime_dir, ignore_errors=True)


async def handshake(worker: Worker) -> Hello:
    hello = await worker.expect(Hello)
    assert isinstance(hello, Hello)
    return hello


def parse_wav(data: bytes) -> tuple[int, int, int, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


# --------------------------------------------------------------------------- handshake


async def test_hello_names_the_worker() -> None:
    async with spawn_worker() as worker:
        hello = await handshake(worker)
        assert hello.v == PROTOCOL_VERSION
        assert hello.pid == worker.proc.pid
        assert hello.kind == "synthetic"


async def test_ping_before_and_after_load() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.send(Ping(id=11))
        pong = await worker.expect(Pong)
        assert pong.id == 11 and pong.memory["rss"] > 0 and pong.memory["vram"] == 0
        await worker.loaded()
        await worker.send(Ping(id=12))
        pong = await worker.expect(Pong)
        assert pong.id == 12 and pong.memory["rss"] > 0


async def test_memory_option_really_grows_rss() -> None:
    async with spawn_worker() as small, spawn_worker() as big:
        await handshake(small)
        await handshake(big)
        await small.loaded(memory_mb=0)
        loaded = await big.loaded(memory_mb=64)
        assert loaded.device == "cpu"
        assert loaded.info == {"memory_mb": 64.0, "type": "tts", "sample_rate": 24000}
        assert loaded.memory["rss"] >= 64 * MIB
        # Two identical processes still differ by a few pages (stacks, allocator arenas), so
        # the 64 MiB are checked to within half a MiB of that noise.
        assert big.rss() - small.rss() >= 64 * MIB - PAGE_NOISE


async def test_load_reports_progress() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.send(
            Load(id=4, name="s", type="tts", device="cpu", options={"load_seconds": 0.35})
        )
        fractions: list[float | None] = []
        started = time.monotonic()
        while True:
            message = await worker.recv()
            if isinstance(message, Progress):
                assert message.id == 4
                fractions.append(message.fraction)
                # The loop keeps answering pings while the model loads in its thread.
                if len(fractions) == 1:
                    await worker.send(Ping(id=99))
            elif isinstance(message, Pong):
                assert message.id == 99
            else:
                break
        assert isinstance(message, Loaded) and message.id == 4
        assert time.monotonic() - started >= 0.3
        assert len(fractions) >= 3 and fractions[-1] == 1.0


# --------------------------------------------------------------------------- calls


async def test_speech_streams_a_valid_wav() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(chunks=5, sample_rate=16000)
        text = "hello world, twenty!"  # 20 characters: 1.2 s at speed 1, 0.6 s at speed 2
        chunks, end = await worker.call(3, input=text, voice="high", speed=2.0)
        # Five pieces, emitted back to back: the outbox may join neighbours into fewer frames,
        # numbered without gaps.
        assert 1 <= len(chunks) <= 5
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert isinstance(end, End)
        data = b"".join(c.data for c in chunks)
        assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
        rate, channels, width, frames = parse_wav(data)
        assert (rate, channels, width) == (16000, 1, 2)
        assert frames == end.result["samples"] == round(0.6 * 16000)
        assert end.result == {"sample_rate": 16000, "samples": frames, "format": "wav"}
        assert len(data) == 44 + 2 * frames


async def test_chunks_emitted_apart_in_time_arrive_as_separate_frames() -> None:
    """Joining only ever merges what was waiting anyway: a real stream stays a stream."""
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(chunks=4, latency_ms=400)  # 100 ms between pieces
        chunks, end = await worker.call(1, input="hello there", response_format="pcm")
        assert isinstance(end, End)
        assert [c.seq for c in chunks] == [0, 1, 2, 3]
        assert len(b"".join(c.data for c in chunks)) == 2 * end.result["samples"]


async def test_speech_pcm_has_no_header() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(chunks=1)
        chunks, end = await worker.call(1, input="x", response_format="pcm")
        assert isinstance(end, End)
        assert [c.seq for c in chunks] == [0]
        samples = round(0.2 * 24000)  # one character is below the 0.2 s minimum
        assert end.result == {"sample_rate": 24000, "samples": samples, "format": "pcm"}
        assert len(chunks[0].data) == 2 * samples
        assert chunks[0].data[:4] != b"RIFF"


async def test_concurrent_calls_are_routed_by_id() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(latency_ms=600, chunks=3, sample_rate=8000)
        inputs = {21: "a" * 10, 22: "b" * 20, 23: "c" * 40}
        for request_id, text in inputs.items():
            await worker.send(Call(id=request_id, op="speech", args={"input": text}))
        chunks: dict[int, list[int]] = {i: [] for i in inputs}
        ends: dict[int, End] = {}
        started = time.monotonic()
        while len(ends) < len(inputs):
            message = await worker.recv()
            if isinstance(message, Chunk):
                assert message.id not in ends, "chunk after end"
                chunks[message.id].append(message.seq)
            else:
                assert isinstance(message, End), message
                ends[message.id] = message
        # They ran side by side: three 0.6 s calls in well under the 1.8 s they take in turn.
        assert time.monotonic() - started < 1.4
        for request_id, text in inputs.items():
            assert chunks[request_id] == [0, 1, 2]
            assert ends[request_id].result["samples"] == round(0.06 * len(text) * 8000)


async def test_max_threads_bounds_concurrent_calls() -> None:
    async with spawn_worker("synthetic", "--max-threads", "1") as worker:
        await handshake(worker)
        await worker.loaded(latency_ms=300, chunks=1)
        started = time.monotonic()
        await worker.send(Call(id=1, op="speech", args={"input": "one"}))
        await worker.send(Call(id=2, op="speech", args={"input": "two"}))
        order: list[int] = []
        while len(order) < 2:
            message = await worker.recv()
            if isinstance(message, End):
                order.append(message.id)
        assert order == [1, 2]
        assert time.monotonic() - started >= 0.6  # one thread: the calls ran in turn


async def test_cancel_stops_a_call_quickly() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(latency_ms=30_000, chunks=2)
        await worker.send(Call(id=5, op="speech", args={"input": "long"}))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await worker.send(Cancel(id=5))
        error = await worker.expect(Error, within_s=2.0)
        assert error.id == 5 and error.code == ErrorCode.CANCELLED
        assert time.monotonic() - started < 1.0
        # Cancelling an id that is finished or unknown is a harmless race.
        await worker.send(Cancel(id=5))
        await worker.send(Cancel(id=12345))
        await worker.send(Ping(id=6))
        assert (await worker.expect(Pong)).id == 6


async def test_bad_requests_are_errors_and_the_worker_stays_up() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded()
        _, error = await worker.call(1, input="hi", voice="galadriel")
        assert isinstance(error, Error) and error.code == ErrorCode.INVALID_REQUEST
        assert "galadriel" in error.message and "tone" in error.message
        _, error = await worker.call(2, input="hi", response_format="mp3")
        assert isinstance(error, Error) and error.code == ErrorCode.UNSUPPORTED
        assert "wav" in error.message and "pcm" in error.message
        _, error = await worker.call(3, input="")
        assert isinstance(error, Error) and error.code == ErrorCode.INVALID_REQUEST
        _, error = await worker.call(4, input="hi", speed=9)
        assert isinstance(error, Error) and error.code == ErrorCode.INVALID_REQUEST
        await worker.send(Call(id=5, op="transcribe", args={}))
        error = await worker.expect(Error)
        assert error.id == 5 and error.code == ErrorCode.UNSUPPORTED
        await worker.send(Ping(id=6))
        assert (await worker.expect(Pong)).id == 6
        chunks, end = await worker.call(1, input="ids can be reused once finished")
        assert isinstance(end, End) and chunks


# --------------------------------------------------------------------------- load failures


async def test_fail_load_is_load_failed() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        error = await worker.load(fail_load=True)
        assert isinstance(error, Error) and error.code == ErrorCode.LOAD_FAILED
        assert "fail_load" in error.message
        await worker.send(Ping(id=2))  # still up until the supervisor shuts it down
        assert (await worker.expect(Pong)).id == 2


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"colour": "red"}, "colour"),
        ({"latency_ms": "fast"}, "latency_ms"),
        ({"chunks": 0}, "chunks"),
        ({"sample_rate": 96000}, "sample_rate"),
        ({"type": "llm"}, "tts"),
    ],
)
async def test_bad_options_are_bad_config(options: dict[str, Any], named: str) -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        error = await worker.load(**options)
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_CONFIG
        assert named in error.message


async def test_unknown_kind_is_bad_config() -> None:
    async with spawn_worker("no-such-kind") as worker:
        hello = await handshake(worker)
        assert hello.kind == "no-such-kind"
        error = await worker.load()
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_CONFIG
        assert "unknown worker kind 'no-such-kind'" in error.message
        assert "synthetic" in error.message


# --------------------------------------------------------------------------- endings


async def test_shutdown_exits_zero() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded()
        await worker.send(Shutdown())
        assert await worker.exit_code(within_s=5.0) == 0


async def test_socket_eof_ends_the_worker() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(latency_ms=30_000)
        # A call stuck in the model must not keep the process alive.
        await worker.send(Call(id=1, op="speech", args={"input": "stuck"}))
        await asyncio.sleep(0.1)
        worker.writer.close()
        assert await worker.exit_code(within_s=2.0) == 0


async def test_crash_on_call_is_a_real_crash() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(crash_on_call=True)
        await worker.send(Call(id=1, op="speech", args={"input": "boom"}))
        assert await worker.recv() is None  # the socket just closes
        assert await worker.exit_code() == -signal.SIGKILL


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x03\xc1\xc1\xc1",  # reserved bytes
        b"\x00\x00\x00\x00",  # zero-length frame
        b"\x7f\xff\xff\xff",  # far over the frame limit
        encode(End(id=1, result=None)),  # a worker-only message
    ],
    ids=["reserved", "empty", "oversized", "wrong-direction"],
)
async def test_garbage_frame_ends_the_worker(garbage: bytes) -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.send_raw(garbage)
        assert await worker.exit_code(within_s=5.0) == 3


async def test_call_before_load_is_a_protocol_error() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.send(Call(id=1, op="speech", args={"input": "hi"}))
        assert await worker.exit_code(within_s=5.0) == 3


async def test_second_load_and_duplicate_call_ids_are_protocol_errors() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded()
        await worker.send(Load(id=2, name="again", type="tts", device="cpu", options={}))
        assert await worker.exit_code(within_s=5.0) == 3
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.loaded(latency_ms=30_000)
        await worker.send(Call(id=1, op="speech", args={"input": "hi"}))
        await worker.send(Call(id=1, op="speech", args={"input": "hi"}))
        assert await worker.exit_code(within_s=5.0) == 3


async def test_orphan_exits_without_connecting() -> None:
    # A parent pid that is not ours: the worker must see it is orphaned and leave at once.
    async with contextlib.AsyncExitStack() as stack:
        runtime_dir = tempfile.mkdtemp(prefix="lw-", dir="/tmp")
        stack.callback(shutil.rmtree, runtime_dir, True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers",
            "--socket",
            os.path.join(runtime_dir, "nobody.sock"),
            "--kind",
            "synthetic",
            "--parent-pid",
            "1",
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert await asyncio.wait_for(proc.wait(), TIMEOUT_S) == 1
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
