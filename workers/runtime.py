"""The worker process's main loop: connect, say hello, load one model, serve its calls.

A worker is a disposable process that holds exactly one model; the supervisor unloads the
model by ending the process, which is the only way to hand all of its memory (CUDA context
included) back. This module is everything in that process except the model itself:

* orphan defence (``PR_SET_PDEATHSIG``, a parent-pid check, exit on socket EOF), so a worker
  never outlives the supervisor that started it;
* the protocol loop: one reader that decodes frames from the supervisor; frames leave whole,
  either from the loop or, for chunks and replies made in model threads, through an outbox
  the loop flushes in batches (:class:`_Outbox`);
* threads for model code: ``load`` and every ``call`` run in a thread pool so the loop keeps
  answering pings and cancels while the model is busy (or stuck in native code);
* translation of model outcomes into exactly one terminal frame per request.

Two small extension points exist for the ``synthetic`` kind's fault injection (and for model
kinds that need them): a model may define ``on_shutdown()``, called from the loop thread when
the supervisor asks the process to end, and :func:`send_raw_from_thread` writes bytes to the
supervisor exactly as given, bypassing every check, so a test worker can break the protocol
on purpose (:func:`flush_from_thread` first makes sure what was emitted is sent). None of
them changes what a well-behaved model sees.

The process ends with :func:`os._exit`: model threads may be stuck in native code, and a
normal interpreter exit would wait for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import faulthandler
import logging
import os
import resource
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import psutil

from workers import event_loop, import_manifest, proctitle, registry
from workers.base import (
    CallContext,
    Cancelled,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
)
from workers.protocol import (
    FROM_SUPERVISOR,
    FROM_WORKER,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_SUPERVISOR_FRAME_BYTES,
    MAX_WORKER_FRAME_BYTES,
    PROTOCOL_VERSION,
    WARMUP_OP,
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
    ProtocolError,
    Shutdown,
    decode_body,
    encode,
    read_message,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_THREADS = 32

#: Exit statuses the supervisor can tell apart in its log.
EXIT_OK = 0
EXIT_ORPHANED = 1
EXIT_PROTOCOL = 3

#: ``--socket tcp:HOST:PORT`` connects over TCP (a worker on a Ray node) instead of a Unix
#: socket; the per-worker secret its hello must carry comes in this variable (never argv,
#: which ``ps`` shows), and is removed from the environment before the model loads.
TCP_PREFIX = "tcp:"
TOKEN_ENV = "LEMONADE_WORKER_TOKEN"

_PR_SET_PDEATHSIG = 1
_HEADER_BYTES = 4
_MAX_COUNTER = 2**63 - 1  # the largest integer a memory field may carry

T = TypeVar("T")

#: The one runtime of this process (set by :meth:`WorkerRuntime.serve`).
_current: WorkerRuntime | None = None


def send_raw_from_thread(data: bytes) -> None:
    """Write ``data`` to the supervisor as it is, from a model thread (fault injection only).

    No framing, no checks: the bytes may be garbage, a lying length prefix, a forged frame.
    The supervisor is expected to treat the result as a protocol violation and kill us.
    """
    runtime = _current
    if runtime is None:
        raise RuntimeError("no worker runtime is serving in this process")
    runtime._send_from_thread(data)


def flush_from_thread() -> None:
    """From a model thread: return once every frame emitted so far is in the socket's hands.

    ``emit`` only queues a frame for the event loop (see :class:`_Outbox`); code that is
    about to end the process on purpose (fault injection) calls this first.
    """
    runtime = _current
    if runtime is None:
        raise RuntimeError("no worker runtime is serving in this process")
    runtime._outbox.wait_flushed()


# --------------------------------------------------------------------------- process setup


def set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when the thread that spawned it dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except OSError as e:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)


def harden_process() -> None:
    # A segfault in native model code leaves the Python stack of every thread in the log.
    faulthandler.enable()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call must fail fast, not hang
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # no multi-GB core dumps
    except (OSError, ValueError) as e:
        log.warning("could not disable core dumps: %s", e)


#: How a worker's log line starts; supervisor/worker_output.py parses the level back out of
#: it, so the two must agree.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """Plain lines on stderr: the supervisor forwards them with a ``[model]`` prefix, at the
    level each line names.

    ``warnings.warn`` goes through logging too (logger ``py.warnings``, WARNING), so a library
    warning reaches the server log as one line at WARNING rather than as two raw stderr lines
    at INFO; Python's default filter still shows each warning once per code location. A
    zygote calls this before it forks, so forked workers inherit the same set-up (and the
    warnings the zygote already showed while importing are not shown again by each fork).
    """
    name = os.environ.get("LEMONADE_LOG_LEVEL", "info").strip().upper()
    level = logging.getLevelName(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_without_source_line)
    if not isinstance(level, int):
        log.warning("unknown LEMONADE_LOG_LEVEL %r; using INFO",
                    os.environ.get("LEMONADE_LOG_LEVEL"))


def _without_source_line(record: logging.LogRecord) -> bool:
    """A captured warning without the source line ``warnings.formatwarning`` appends (the
    code that called ``warn``): one warning, one line in the server log."""
    if isinstance(record.msg, str) and not record.args:  # logging logs str(s) as the msg
        text = record.msg.rstrip("\n")
        head, sep, last = text.rpartition("\n")
        record.msg = head if sep and last.startswith("  ") else text
    return True


def _byte_count(value: object) -> int | None:
    """A byte count a model reported, as the protocol takes it (or None)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None  # also NaN
    return _MAX_COUNTER if value >= _MAX_COUNTER else int(value)  # also inf


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_now(code: int) -> NoReturn:
    """End the process at once, without waiting for model threads (they may never return)."""
    flush_logs()
    os._exit(code)


def _rss_bytes() -> int:
    try:
        return int(psutil.Process().memory_info().rss)
    except psutil.Error:
        return 0


def _error(request_id: int, code: object, message: object) -> Error:
    """An ``error`` frame the supervisor will accept, whatever the model put in it."""
    text = str(message)
    if not isinstance(code, str) or code not in ErrorCode.ALL:
        text = f"(model used unknown error code {code!r:.40}) {text}"
        code = ErrorCode.INTERNAL
    return Error(id=request_id, code=code, message=text[:MAX_ERROR_MESSAGE_CHARS])


def _checked_frame(message: Message) -> bytes:
    """Encode a frame and check it as the supervisor will, so a model bug cannot make the
    worker send something that gets it killed; raises ``ValueError`` instead."""
    try:
        frame = encode(message)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"cannot encode {message.T} frame: {type(e).__name__}: {e}") from None
    if len(frame) - _HEADER_BYTES > MAX_WORKER_FRAME_BYTES:
        raise ValueError(
            f"{message.T} frame of {len(frame)} bytes exceeds {MAX_WORKER_FRAME_BYTES} bytes"
        )
    data = message.data if isinstance(message, Chunk) else None
    if not isinstance(data, bytes | str):
        # Maps and numbers are small; bytes and strings cannot break the schema.
        try:
            decode_body(frame[_HEADER_BYTES:], FROM_WORKER)
        except ProtocolError as e:
            raise ValueError(f"{message.T} frame would break the protocol: {e}") from None
    return frame


# --------------------------------------------------------------------------- the loop


@dataclass
class _CallState:
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Held while a chunk is checked and queued, so that queue order is emit order even if
    #: a model emits from several threads, and nothing is queued after the call finished.
    emitting: threading.Lock = field(default_factory=threading.Lock)
    #: The next chunk's sequence number; only the outbox flush (in the loop) numbers chunks.
    seq: int = 0
    finished: bool = False


@dataclass
class _QueuedChunk:
    """A chunk waiting in the outbox; it gets its number (and maybe neighbours) at flush."""

    call_id: int
    state: _CallState
    data: Any

    @property
    def size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes | str) else _FRAME_GUESS


_FRAME_GUESS = 256  # what a small non-bytes chunk costs in the outbox, roughly
_CHUNK_FRAME_OVERHEAD = 64  # a chunk frame's bytes beyond its data (keys, id, seq)
#: Adjacent byte chunks of one call are joined into frames of at most this size at flush.
_MERGED_CHUNK_BYTES = 1024 * 1024


class _Outbox:
    """Frames from model threads, written by the event loop in batches.

    A model thread must not wait for the loop for every chunk: a round trip through
    ``run_coroutine_threadsafe`` costs a loop wake-up and a thread switch per frame, which
    for a small answer cut into a few chunks was most of a call's time. Threads append to a
    list instead, the first append schedules one flush, and the flush hands every waiting
    frame to the socket at once (one ``send`` for a burst of chunks, usually with the call's
    ``end``). Byte chunks of one call that are still waiting side by side are joined into one
    frame (up to 1 MiB): audio pieces the supervisor would only concatenate again. Order is
    kept: items leave in the order they were put, and chunks are numbered as they leave.

    Backpressure: ``put`` blocks while more than ``MAX_QUEUED_BYTES`` wait for a flush or
    while the socket's own buffer is over ``HIGH_WATER_BYTES`` (the supervisor reads
    slower than the model produces), until the loop has drained it.
    """

    MAX_QUEUED_BYTES = 4 * 1024 * 1024
    HIGH_WATER_BYTES = 256 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter) -> None:
        self._loop = loop
        self._writer = writer
        self._room = threading.Condition()
        self._items: list[bytes | _QueuedChunk] = []
        self._queued = 0
        self._flush_scheduled = False
        self._paused = False
        self._drainer: asyncio.Task[None] | None = None

    def put(self, item: bytes | _QueuedChunk) -> None:
        """Queue an encoded frame, or a chunk to be numbered (and maybe joined) at flush."""
        size = len(item) if isinstance(item, bytes) else item.size
        with self._room:
            while self._paused or (self._items and self._queued >= self.MAX_QUEUED_BYTES):
                self._room.wait()
            self._items.append(item)
            self._queued += size
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            self._loop.call_soon_threadsafe(self._flush)

    def wait_flushed(self) -> None:
        """Block (in a thread) until every frame put so far was handed to the transport."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Callbacks run in order, so this one runs after every flush scheduled before it.
        self._loop.call_soon_threadsafe(done.set_result, None)
        done.result()

    def _flush(self) -> None:
        with self._room:
            items, self._items = self._items, []
            self._queued = 0
            self._flush_scheduled = False
            self._room.notify_all()
        frames = _frames_of(items)
        try:
            self._writer.writelines(frames)
        except (ConnectionError, OSError) as e:
            log.info("connection to supervisor lost while writing (%s); exiting", e)
            _exit_now(EXIT_OK)
        transport = self._writer.transport
        if transport.get_write_buffer_size() > self.HIGH_WATER_BYTES and self._drainer is None:
            with self._room:
                self._paused = True
            self._drainer = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            log.info("connection to supervisor lost while writing (%s); exiting", e)
            _exit_now(EXIT_OK)
        finally:
            self._drainer = None
            with self._room:
                self._paused = False
                self._room.notify_all()


def _frames_of(items: list[bytes | _QueuedChunk]) -> list[bytes]:
    """Encode queued items in order, joining runs of one call's byte chunks."""
    frames: list[bytes] = []
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if isinstance(item, bytes):
            frames.append(item)
            continue
        data = item.data
        if isinstance(data, bytes):
            parts = [data]
            size = len(data)
            while i < len(items):
                following = items[i]
                if (not isinstance(following, _QueuedChunk) or following.call_id != item.call_id
                        or not isinstance(following.data, bytes)
                        or size + len(following.data) > _MERGED_CHUNK_BYTES):
                    break
                parts.append(following.data)
                size += len(following.data)
                i += 1
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        # Checked when it was emitted, so encoding cannot fail here.
        frames.append(encode(Chunk(id=item.call_id, seq=item.state.seq, data=data)))
        item.state.seq += 1
    return frames


class WorkerRuntime:
    """One connection to the supervisor and the one model behind it."""

    def __init__(
        self,
        kind: str,
        model_class: type[Model] | None,
        kind_error: str | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_threads: int,
        modules_at_fork: frozenset[str] | None = None,
    ) -> None:
        self.kind = kind
        #: What the zygote had imported (forked workers only): what a load imports beyond it
        #: is recorded for the zygote to import too (:mod:`workers.import_manifest`).
        self._modules_at_fork = modules_at_fork
        self._model_class = model_class
        self._kind_error = kind_error
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._outbox = _Outbox(self._loop, writer)
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="model")
        self._model: Model | None = None
        self._load_seen = False
        self._calls: dict[int, _CallState] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- writing

    async def _write(self, frame: bytes) -> None:
        async with self._write_lock:
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                # The supervisor is gone: nobody is left to serve.
                log.info("connection to supervisor lost while writing (%s); exiting", e)
                _exit_now(EXIT_OK)

    async def send(self, message: Message) -> None:
        await self._write(encode(message))

    def _send_from_thread(self, frame: bytes) -> None:
        """Write a frame from a model thread (through the outbox: see :class:`_Outbox`)."""
        self._outbox.put(frame)

    # ------------------------------------------------------------- reading

    async def serve(self) -> NoReturn:
        global _current
        _current = self
        await self.send(Hello(v=PROTOCOL_VERSION, pid=os.getpid(), kind=self.kind,
                              token=os.environ.pop(TOKEN_ENV, None)))
        while True:
            try:
                message = await read_message(
                    self._reader, FROM_SUPERVISOR, max_frame=MAX_SUPERVISOR_FRAME_BYTES
                )
            except ProtocolError as e:
                self._protocol_error(str(e))
            except (ConnectionError, OSError) as e:
                log.info("connection to supervisor lost (%s); exiting", e)
                _exit_now(EXIT_OK)
            if message is None:
                log.info("supervisor closed the connection; exiting")
                _exit_now(EXIT_OK)
            self._dispatch(message)

    def _protocol_error(self, reason: str) -> NoReturn:
        log.error("protocol error from supervisor: %s; exiting", reason)
        _exit_now(EXIT_PROTOCOL)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Ping):
            self._spawn(self.send(Pong(id=message.id, memory=self._memory())))
        elif isinstance(message, Call):
            self._start_call(message)
        elif isinstance(message, Cancel):
            state = self._calls.get(message.id)
            if state is not None:  # an unknown id is a race with the end, not an error
                state.cancelled.set()
        elif isinstance(message, Load):
            if self._load_seen:
                self._protocol_error(f"second load (id {message.id})")
            self._load_seen = True
            self._spawn(self._load(message))
        elif isinstance(message, Shutdown):
            log.info("shutdown requested; exiting")
            hook = getattr(self._model, "on_shutdown", None)
            if callable(hook):
                # Runs in the loop thread on purpose: a hook that hangs hangs the process,
                # which is what the supervisor's stop escalation (SIGTERM, SIGKILL) is for.
                try:
                    hook()
                except Exception:
                    log.exception("on_shutdown() failed")
            with contextlib.suppress(Exception):
                self._writer.close()
            _exit_now(EXIT_OK)
        else:  # pragma: no cover - FROM_SUPERVISOR admits nothing else
            self._protocol_error(f"unexpected {message.T}")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # strong reference until done
        task.add_done_callback(self._tasks.discard)

    def _memory(self) -> dict[str, int]:
        vram = 0
        if self._model is not None:
            try:
                vram = min(max(0, int(self._model.vram_bytes())), _MAX_COUNTER)
            except Exception:
                log.exception("vram_bytes() failed")
        return {"rss": min(_rss_bytes(), _MAX_COUNTER), "vram": vram}

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        def contained() -> T:
            # sys.exit() or a stray KeyboardInterrupt in model code must not unwind the
            # event loop: it becomes an ordinary failure of this one request.
            try:
                return fn()
            except (SystemExit, KeyboardInterrupt) as e:
                raise RuntimeError(f"model code raised {type(e).__name__}") from e

        return await self._loop.run_in_executor(self._pool, contained)

    # ------------------------------------------------------------- load

    async def _load(self, message: Load) -> None:
        proctitle.worker(message.name, self.kind)  # from now on ps shows which model this is
        if self._model_class is None:
            await self.send(_error(message.id, ErrorCode.BAD_CONFIG, self._kind_error or ""))
            return
        model_class = self._model_class

        def report(fraction: float | None, text: str, *, done_bytes: int | None = None,
                   total_bytes: int | None = None) -> None:
            if fraction is not None:
                fraction = min(1.0, max(0.0, float(fraction))) if fraction == fraction else None
            done, total = _byte_count(done_bytes), _byte_count(total_bytes)
            if done is not None and total is not None and done > total:
                total = None  # a size that grew past its estimate: the estimate was wrong
            progress = Progress(
                id=message.id, fraction=fraction, message=str(text)[:MAX_ERROR_MESSAGE_CHARS],
                done_bytes=done, total_bytes=total,
            )
            self._send_from_thread(encode(progress))

        request = LoadRequest(
            name=message.name, type=message.type, device=message.device, options=message.options
        )

        def run() -> tuple[Model, LoadResult]:
            model = model_class()
            result = model.load(request, LoadContext(report))
            self._learn_imports()
            return model, result

        try:
            model, result = await self._in_thread(run)
        except ModelError as e:
            log.warning("load of %s failed: %s: %s", message.name, e.code, e.message)
            await self.send(_error(message.id, e.code, e.message))
            return
        except MemoryError as e:
            log.error("load of %s ran out of memory", message.name)
            await self.send(_error(message.id, ErrorCode.OUT_OF_MEMORY, f"out of memory: {e}"))
            return
        except Exception as e:
            log.error("load of %s failed:\n%s", message.name, traceback.format_exc())
            await self.send(_error(message.id, ErrorCode.LOAD_FAILED, f"{type(e).__name__}: {e}"))
            return
        self._model = model
        loaded = Loaded(
            id=message.id,
            device=str(result.device),
            memory=self._memory(),
            info=dict(result.info),
        )
        try:
            frame = _checked_frame(loaded)
        except ValueError as e:
            self._model = None
            await self.send(_error(message.id, ErrorCode.INTERNAL, f"bad load result: {e}"))
            return
        log.info("model %s loaded on %s", message.name, loaded.device)
        await self._write(frame)

    def _learn_imports(self) -> None:
        if self._modules_at_fork is not None:
            added = import_manifest.learn(self.kind, self._modules_at_fork)
            if added:
                log.info("recorded %d modules this load imported for the zygote to import", added)

    # ------------------------------------------------------------- calls

    def _start_call(self, message: Call) -> None:
        if self._model is None:
            self._protocol_error(f"call {message.id} before a successful load")
        if message.id in self._calls:
            self._protocol_error(f"call id {message.id} is already in flight")
        state = _CallState()
        self._calls[message.id] = state
        self._run_call(message, self._model, state)

    def _run_call(self, message: Call, model: Model, state: _CallState) -> None:
        """Hand the call to a model thread now (no task in between: this is the hot path);
        the thread sends the reply itself, through the outbox."""
        def emit(data: Any) -> None:
            if isinstance(data, bytearray | memoryview):
                data = bytes(data)
            with state.emitting:
                if state.finished:
                    raise RuntimeError(f"emit after call {message.id} finished")
                if isinstance(data, bytes):
                    if len(data) > MAX_WORKER_FRAME_BYTES - _CHUNK_FRAME_OVERHEAD:
                        raise ValueError(f"chunk frame of {len(data)} bytes exceeds "
                                         f"{MAX_WORKER_FRAME_BYTES} bytes")
                else:  # check now, so the model hears of a bad chunk; numbered at flush
                    _checked_frame(Chunk(id=message.id, seq=0, data=data))
                self._outbox.put(_QueuedChunk(message.id, state, data))

        def run() -> Any:
            try:
                if state.cancelled.is_set():  # cancelled while queued for a thread
                    raise Cancelled()
                result = model.call(message.op, message.args, CallContext(emit, state.cancelled))
                if message.op == WARMUP_OP:
                    self._learn_imports()  # before the reply: the supervisor acts on it
                return result
            finally:
                with state.emitting:
                    state.finished = True

        def run_and_reply() -> None:
            # The terminal frame leaves from this thread, through the outbox, so that it
            # usually shares one send with the call's last chunks.
            reply: Message
            try:
                reply = End(id=message.id, result=run())
            except SystemExit as e:  # sys.exit() in model code fails this request only
                reply = _error(message.id, ErrorCode.INTERNAL, f"model code raised {e!r}")
            except ModelError as e:
                reply = _error(message.id, e.code, e.message)
            except Cancelled:
                reply = _error(message.id, ErrorCode.CANCELLED, "cancelled")
            except MemoryError as e:
                reply = _error(message.id, ErrorCode.OUT_OF_MEMORY, f"out of memory: {e}")
            except Exception as e:
                log.error("call %d (%s) failed:\n%s", message.id, message.op,
                          traceback.format_exc())
                reply = _error(message.id, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
            try:
                frame = _checked_frame(reply)
            except ValueError as e:
                log.error("call %d (%s) returned a bad result: %s", message.id, message.op, e)
                frame = encode(_error(message.id, ErrorCode.INTERNAL, f"bad call result: {e}"))
            self._outbox.put(frame)

        def finished(future: concurrent.futures.Future[None]) -> None:
            # In a model thread (or here, if the pool refused the job): hop to the loop.
            self._loop.call_soon_threadsafe(self._call_finished, message, future)

        self._pool.submit(run_and_reply).add_done_callback(finished)

    def _call_finished(self, message: Call, future: concurrent.futures.Future[None]) -> None:
        del self._calls[message.id]
        error = future.exception()
        if error is not None:  # KeyboardInterrupt in a model thread, or a bug in the reply
            log.error("call %d (%s) ended without a reply: %r", message.id, message.op, error)
            self._spawn(self._write(encode(_error(message.id, ErrorCode.INTERNAL,
                                                  f"{type(error).__name__}: {error}"))))


# --------------------------------------------------------------------------- entry point


async def _serve(socket_path: str, kind: str, max_threads: int,
                 modules_at_fork: frozenset[str] | None) -> NoReturn:
    model_class: type[Model] | None = None
    kind_error: str | None = None
    try:
        model_class = registry.resolve(kind)
    except KeyError as e:
        kind_error = str(e)
    except Exception as e:
        log.error("worker kind %r cannot be used:\n%s", kind, traceback.format_exc())
        kind_error = f"worker kind {kind!r} cannot be used: {type(e).__name__}: {e}"
    if kind_error is not None:
        log.error("%s", kind_error)
    try:
        if socket_path.startswith(TCP_PREFIX):
            # A worker on a cluster node: the supervisor is on another machine.
            host, _, port = socket_path[len(TCP_PREFIX):].rpartition(":")
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        else:
            reader, writer = await asyncio.open_unix_connection(socket_path)
    except (OSError, ValueError) as e:
        log.error("cannot connect to supervisor at %s: %s", socket_path, e)
        _exit_now(EXIT_ORPHANED)
    runtime = WorkerRuntime(kind, model_class, kind_error, reader, writer, max_threads,
                            modules_at_fork)
    await runtime.serve()


def main(
    socket_path: str,
    kind: str,
    parent_pid: int,
    max_threads: int = DEFAULT_MAX_THREADS,
    forked: bool = False,
) -> int:
    """Run the worker; normally ends the process itself (see the module docstring).

    ``forked``: this process was forked from its kind's zygote, so it records the modules
    its load imports beyond the zygote's. Returns an exit status only when the worker cannot
    start: its parent is already gone.
    """
    modules_at_fork = frozenset(sys.modules) if forked else None
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        # The parent died before PR_SET_PDEATHSIG was armed: nobody is waiting for us.
        log.error("parent %d is gone (ppid is %d); exiting", parent_pid, os.getppid())
        return EXIT_ORPHANED
    harden_process()
    event_loop.run(_serve(socket_path, kind, max_threads, modules_at_fork))
    return EXIT_OK  # pragma: no cover - _serve never returns


__all__ = [
    "DEFAULT_MAX_THREADS", "WorkerRuntime", "flush_logs", "harden_process", "main",
    "set_parent_death_signal", "setup_logging",
]
