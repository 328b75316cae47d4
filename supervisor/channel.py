"""The supervisor's end of one worker socket: request ids, routing, streams, cancel.

One reader task reads every frame the worker sends and routes it by request id to the
request waiting for it. Many calls can be in flight on one worker; each gets its own queue.
Anything the worker sends that breaks the rules (bad frame, unknown or finished id, a chunk
out of order, a message type that does not belong to that request) is a protocol violation:
the channel closes, every pending request fails with 502, and ``on_broken`` tells the owner
to kill the worker.

A call whose consumer goes away (the HTTP client disconnected) sends ``cancel`` and stays
registered until its terminal frame arrives, so late chunks are dropped, not misrouted.

A call that runs past its deadline gets a 504, a ``cancel``, and a liveness probe: the worker
is pinged, and one that cannot answer a ping within ``hang_timeout_s`` (a stopped process,
a loop stuck in native code) is reported broken, so the owner kills it and the next request
starts a fresh one instead of queueing behind a dead worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from supervisor.errors import (
    BadRequest,
    GatewayTimeout,
    LemonadeError,
    ServiceUnavailable,
    WorkerFailed,
)
from workers.protocol import (
    FRAME_BODY_DEADLINE_S,
    FROM_WORKER,
    MAX_WORKER_FRAME_BYTES,
    Call,
    Cancel,
    Chunk,
    End,
    ErrorCode,
    FrameSplitter,
    Load,
    Loaded,
    Message,
    Ping,
    Pong,
    Progress,
    ProtocolError,
    Shutdown,
    encode,
)
from workers.protocol import Error as ErrorMsg

log = logging.getLogger(__name__)

_AFTER_HELLO = {t: cls for t, cls in FROM_WORKER.items() if t != "hello"}
#: One read takes up to this much of what the worker sent (many frames at once).
_READ_BYTES = 256 * 1024


_STATUS_BY_CODE: dict[str, type[LemonadeError]] = {
    ErrorCode.INVALID_REQUEST: BadRequest,
    ErrorCode.UNSUPPORTED: BadRequest,
    ErrorCode.BAD_CONFIG: ServiceUnavailable,
    ErrorCode.LOAD_FAILED: ServiceUnavailable,
    ErrorCode.OUT_OF_MEMORY: ServiceUnavailable,
    ErrorCode.CANCELLED: ServiceUnavailable,
    ErrorCode.INTERNAL: WorkerFailed,
}


def worker_error(code: str, message: str) -> LemonadeError:
    """An ``error`` message from the worker as the matching HTTP error, keeping its code."""
    error_cls = _STATUS_BY_CODE.get(code, WorkerFailed)
    # A 503 always says when to come back (the status-code policy: never a bare 503).
    retry = 1.0 if error_cls is ServiceUnavailable else None
    error = error_cls(message, code=code, retry_after_s=retry)
    error.worker_code = code
    return error


#: Bytes of answers one request may have waiting for its consumer before the channel stops
#: reading the socket (backpressure: a flooding worker meets a slow client, memory stays flat).
MAX_BUFFERED_BYTES = 4 * 1024 * 1024
_FRAME_OVERHEAD = 256  # what a queued message costs beyond its payload, roughly


def _cost(item: Message | BaseException) -> int:
    data = getattr(item, "data", None)
    return _FRAME_OVERHEAD + (len(data) if isinstance(data, bytes | str) else 0)


class _Pending:
    """One outstanding request: which message types it accepts and where they go."""

    def __init__(self, accepts: frozenset[str]) -> None:
        self.accepts = accepts
        self.queue: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self.buffered = 0
        self.space = asyncio.Event()
        self.space.set()
        self.next_seq = 0
        self.abandoned = False

    def put(self, item: Message | BaseException) -> None:
        self.queue.put_nowait(item)
        self.buffered += _cost(item)
        if self.buffered > MAX_BUFFERED_BYTES:
            self.space.clear()

    def took(self, item: Message | BaseException) -> None:
        self.buffered -= _cost(item)
        if self.buffered <= MAX_BUFFERED_BYTES // 2:
            self.space.set()

    def abandon(self) -> None:
        """Nobody will read this queue again: drop what is in it and never block the reader."""
        self.abandoned = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.buffered = 0
        self.space.set()


_TERMINAL = frozenset({"end", "error", "loaded", "pong"})


class Channel:
    def __init__(
        self,
        model: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_broken: Callable[[str], None],
        on_lost: Callable[[str], None] | None = None,
        hang_timeout_s: float = 30.0,
    ) -> None:
        self.model = model
        self.hang_timeout_s = hang_timeout_s
        self._probe: asyncio.Task[None] | None = None
        self._reader = reader
        self._writer = writer
        self._on_broken = on_broken
        #: Called when the connection ends by itself (EOF, a socket error), not by close().
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._write_lock = asyncio.Lock()
        self.closed_reason: str | None = None
        self._reading_paused = False
        self._pauses = 0
        self._task = asyncio.create_task(self._read_loop(), name=f"channel-{model}")

    # ----------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        # Whole blocks, split here (one read and no per-frame awaits for a burst of frames);
        # a frame that has begun must be complete within FRAME_BODY_DEADLINE_S.
        frames = FrameSplitter(_AFTER_HELLO, max_frame=MAX_WORKER_FRAME_BYTES)
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = frames.frame_started_at
                if started is None:
                    data = await self._reader.read(_READ_BYTES)
                else:
                    try:
                        async with asyncio.timeout_at(started + FRAME_BODY_DEADLINE_S):
                            data = await self._reader.read(_READ_BYTES)
                    except TimeoutError:
                        raise ProtocolError(f"a frame did not arrive within "
                                            f"{FRAME_BODY_DEADLINE_S}s") from None
                if not data:
                    frames.check_eof()
                    self._close("the worker closed its connection", lost=True)
                    return
                for msg in frames.feed(data, loop.time()):
                    pending = self._route(msg)
                    if pending is not None and not pending.space.is_set():
                        # The consumer is slower than the worker: stop reading (the frames
                        # already split are routed first) until it catches up.
                        self._reading_paused = True
                        self._pauses += 1
                        try:
                            await pending.space.wait()
                        finally:
                            self._reading_paused = False
        except ProtocolError as e:
            log.warning("worker for %s broke the protocol: %s", self.model, e)
            self._close(f"the worker broke the protocol ({e})", broken=True)
        except (ConnectionError, OSError) as e:
            self._close(f"the worker connection failed ({e})", lost=True)
        except asyncio.CancelledError:
            self._close("the channel was closed")
            raise

    def _route(self, msg: Message) -> _Pending | None:
        request_id: int = msg.id  # type: ignore[attr-defined]
        pending = self._pending.get(request_id)
        if pending is None:
            raise ProtocolError(f"{msg.T} for unknown or finished request id {request_id}")
        if msg.T not in pending.accepts:
            raise ProtocolError(f"{msg.T} is not a valid answer to request {request_id}")
        if isinstance(msg, Chunk):
            if msg.seq != pending.next_seq:
                raise ProtocolError(
                    f"chunk {msg.seq} of request {request_id} arrived, expected {pending.next_seq}"
                )
            pending.next_seq += 1
        if msg.T in _TERMINAL:
            del self._pending[request_id]
        if pending.abandoned:
            return None
        pending.put(msg)
        return pending

    def _close(self, reason: str, *, broken: bool = False, lost: bool = False) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        error = WorkerFailed(f"worker for '{self.model}' failed: {reason}")
        for pending in self._pending.values():
            pending.put(error)
            pending.space.set()
        self._pending.clear()
        self._writer.close()
        if broken:
            self._on_broken(reason)
        elif lost and self._on_lost is not None:
            self._on_lost(reason)

    def close(self) -> None:
        self._close("the model was unloaded")
        self._task.cancel()
        if self._probe is not None:
            self._probe.cancel()

    def probe_liveness(self) -> None:
        """After a call timed out: ping; a worker that cannot answer is hung and is killed."""
        if self.closed_reason is not None or self._probe is not None:
            return
        self._probe = asyncio.create_task(self._run_probe(), name=f"probe-{self.model}")

    async def _run_probe(self) -> None:
        try:
            await self.ping(self.hang_timeout_s)
        except TimeoutError:
            log.error("worker for %s answered no ping within %gs after a call timed out; "
                      "it is hung", self.model, self.hang_timeout_s)
            self._close(f"the worker is hung (no answer to a ping within "
                        f"{self.hang_timeout_s:g}s)", broken=True)
        except LemonadeError:
            pass  # the channel closed meanwhile
        finally:
            self._probe = None

    @property
    def is_open(self) -> bool:
        return self.closed_reason is None

    # ----------------------------------------------------------------- writing

    async def send(
        self, message: Message, on_written: Callable[[], None] | None = None
    ) -> None:
        if self.closed_reason is not None:
            raise WorkerFailed(f"worker for '{self.model}' is gone: {self.closed_reason}")
        async with self._write_lock:
            try:
                self._writer.write(encode(message))
                if on_written is not None:
                    on_written()  # the frame is on its way even if drain() is cancelled
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self._close(f"writing to the worker failed ({e})")
                raise WorkerFailed(f"worker for '{self.model}' is gone: {e}") from None

    # The interface a request on this channel uses (the load, a ping, a CallStream):
    # register an id, send frames, take the answers addressed to it, drop it.

    def register(self, accepts: frozenset[str]) -> tuple[int, _Pending]:
        """A new request id and the queue its answers (of the types ``accepts``) arrive in."""
        request_id = next(self._ids)
        pending = _Pending(accepts)
        self._pending[request_id] = pending
        return request_id, pending

    def drop(self, request_id: int) -> None:
        """Forget a request the worker never heard of (its frame was never written)."""
        self._pending.pop(request_id, None)

    def is_pending(self, request_id: int) -> bool:
        """Whether the worker may still answer ``request_id``."""
        return request_id in self._pending

    def _forget(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.abandon()

    async def next_message(self, pending: _Pending, timeout_s: float | None) -> Message:
        """The next answer to a registered request (TimeoutError after ``timeout_s``)."""
        if not pending.queue.empty():
            item = pending.queue.get_nowait()  # the common case mid-answer: no timer needed
        else:
            # asyncio.timeout, not wait_for: wait_for wraps the get in a new Task each time,
            # a measurable cost on a path taken for every frame of every answer.
            async with asyncio.timeout(timeout_s):
                item = await pending.queue.get()
        pending.took(item)
        if isinstance(item, BaseException):
            raise item
        return item

    # ----------------------------------------------------------------- requests

    async def load(
        self,
        *,
        name: str,
        type: str,
        device: str,
        options: dict[str, Any],
        timeout_s: float,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Loaded:
        request_id, pending = self.register(frozenset({"progress", "loaded", "error"}))
        await self.send(Load(id=request_id, name=name, type=type, device=device, options=options))
        while True:
            # Stall-based: every progress report starts the window again, so a big model
            # that keeps reporting may take longer, and a silent one is given up on.
            try:
                msg = await self.next_message(pending, timeout_s)
            except TimeoutError:
                self._forget(request_id)
                raise GatewayTimeout(
                    f"model '{name}' sent no progress and did not finish loading within "
                    f"{timeout_s:g}s"
                ) from None
            if isinstance(msg, Progress):
                if on_progress is not None:
                    on_progress(msg)
                continue
            if isinstance(msg, ErrorMsg):
                raise worker_error(msg.code, msg.message)
            assert isinstance(msg, Loaded)
            return msg

    async def ping(self, timeout_s: float) -> Pong:
        request_id, pending = self.register(frozenset({"pong"}))
        await self.send(Ping(id=request_id))
        while True:
            pauses = self._pauses
            try:
                msg = await self.next_message(pending, timeout_s)
                break
            except TimeoutError:
                if self._reading_paused or self._pauses != pauses:
                    continue  # we stopped reading (a slow client), not the worker answering
                self._forget(request_id)
                raise
        assert isinstance(msg, Pong)
        return msg

    async def send_shutdown(self) -> None:
        """Best effort: the worker may already be gone."""
        with contextlib.suppress(LemonadeError):
            await asyncio.wait_for(self.send(Shutdown()), 1.0)

    def call(self, op: str, args: dict[str, Any], *, timeout_s: float) -> CallStream:
        return CallStream(self, op, args, timeout_s)

    @property
    def pending_count(self) -> int:
        return len(self._pending)


class CallStream:
    """One call: iterate for chunks; ``result`` holds the final value after the end.

    Use ``async with channel.call(...) as stream:`` so that leaving early (the client went
    away, an exception) cancels the call on the worker.
    """

    def __init__(self, channel: Channel, op: str, args: dict[str, Any], timeout_s: float) -> None:
        self._channel = channel
        self._op = op
        self._args = args
        self._timeout_s = timeout_s
        self._id: int | None = None
        self._pending: _Pending | None = None
        self._deadline = 0.0
        self._sent = False
        self.finished = False
        self.result: Any = None

    async def start(self) -> None:
        if self._id is not None:
            return
        self._id, self._pending = self._channel.register(frozenset({"chunk", "end", "error"}))
        self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            await self._channel.send(Call(id=self._id, op=self._op, args=self._args),
                                      on_written=self._mark_sent)
        except BaseException:
            if not self._sent:  # the worker never heard of it: forget it
                self.finished = True
                self._channel.drop(self._id)
            raise  # if it was sent, aclose() cancels it on the worker

    def _mark_sent(self) -> None:
        self._sent = True

    async def __aenter__(self) -> CallStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        await self.start()
        if self.finished:
            raise StopAsyncIteration
        assert self._pending is not None
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            msg = await self._channel.next_message(self._pending, max(0.0, remaining))
        except TimeoutError:
            await self.aclose()
            self._channel.probe_liveness()
            raise GatewayTimeout(
                f"model '{self._channel.model}' did not answer within {self._timeout_s:g}s"
            ) from None
        except LemonadeError:
            self.finished = True  # the channel closed under us: nothing left to cancel
            raise
        # CancelledError (the HTTP client went away) leaves the call unfinished on purpose,
        # so that aclose() tells the worker to stop.
        if isinstance(msg, Chunk):
            return msg.data
        self.finished = True
        if isinstance(msg, ErrorMsg):
            raise worker_error(msg.code, msg.message)
        assert isinstance(msg, End)
        self.result = msg.result
        raise StopAsyncIteration

    async def collect(self) -> list[Any]:
        return [data async for data in self]

    async def aclose(self) -> None:
        """Cancel the call on the worker if it has not finished."""
        if self.finished or self._id is None or self._pending is None:
            self.finished = True
            return
        self.finished = True
        self._pending.abandon()
        if self._channel.is_pending(self._id) and self._channel.is_open:
            # Shielded: this often runs inside a cancelled handler, and the worker must hear it.
            with contextlib.suppress(LemonadeError, asyncio.CancelledError):
                await asyncio.shield(self._channel.send(Cancel(id=self._id)))
