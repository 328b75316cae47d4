"""The helper servers ``bench/hop.py`` compares the supervisor against, one per process.

Each runs in a process of its own (multiprocessing, spawn context), loads
``workers.synthetic.SyntheticModel`` itself with the benchmark's options, and answers the
same speech request with the same bytes:

* :func:`serve_in_process`: an aiohttp app that calls the model directly in its handler
  (the no-hop baseline; a second instance is the proxy's backend);
* :func:`serve_proxy`: an aiohttp reverse proxy that forwards each request over a keep-alive
  HTTP connection to a backend (the llama-swap / Lemonade architecture);
* :func:`serve_raw`: length-prefixed msgpack on a Unix socket, no HTTP at all (the floor).

:class:`Helper` starts one and stops it; a helper also dies with the benchmark if that is
killed outright, so no server is left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from workers import event_loop
from workers.base import CallContext, LoadContext, LoadRequest
from workers.runtime import set_parent_death_signal
from workers.synthetic import SyntheticModel

SPEECH_PATH = "/v1/audio/speech"
#: Recipe options every path loads the model with (the supervisor's config is built from
#: them too). sample_rate 8000 keeps the answer a few KB; chunks 4 is the kind's default:
#: the worker sends four chunk frames and an end frame per call.
OPTIONS: dict[str, Any] = {"latency_ms": 0, "sample_rate": 8000, "chunks": 4}
_FRAME_HEADER = 4
_START_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- the work


def load_model() -> SyntheticModel:
    model = SyntheticModel()
    model.load(LoadRequest(name="tone", type="tts", device="cpu", options=OPTIONS),
               LoadContext(lambda fraction, message: None))
    return model


def speech_args(body: dict[str, Any]) -> dict[str, Any]:
    """The call arguments the supervisor's speech route builds from the same JSON body."""
    return {
        "input": body["input"],
        "response_format": body.get("response_format", "wav"),
        "speed": body.get("speed", 1.0),
        "stream": False,
    }


def speak(model: SyntheticModel, args: dict[str, Any]) -> bytes:
    """One speech call, its chunks joined: what the supervisor sends for a non-streamed call."""
    pieces: list[bytes] = []
    model.call("speech", args, CallContext(pieces.append, threading.Event()))
    return b"".join(pieces)


# --------------------------------------------------------------------------- the servers


def serve_in_process(conn: Connection, threaded: bool = False) -> None:
    """An aiohttp app whose handler calls the model itself: in the event loop thread (the
    strict baseline), or with ``threaded`` in a thread pool, as a server must that stays
    responsive (health checks, cancels) while a real model runs for seconds."""
    _become_helper()
    model = load_model()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4) if threaded else None

    async def speech(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        args = speech_args(body)
        if pool is None:
            audio = speak(model, args)
        else:
            audio = await asyncio.get_running_loop().run_in_executor(pool, speak, model, args)
        return web.Response(body=audio, content_type="audio/wav")

    async def make_app() -> web.Application:
        app = web.Application()
        app.router.add_post(SPEECH_PATH, speech)
        return app

    _run_http(conn, make_app)


def serve_proxy(conn: Connection, backend_port: int) -> None:
    """An aiohttp reverse proxy: each request goes on, over keep-alive HTTP, to the backend."""
    _become_helper()
    url = f"http://127.0.0.1:{backend_port}{SPEECH_PATH}"
    session: aiohttp.ClientSession | None = None

    async def speech(request: web.Request) -> web.Response:
        assert session is not None
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.post(url, data=body, headers=headers) as upstream:
            payload = await upstream.read()
            return web.Response(body=payload, status=upstream.status,
                                content_type=upstream.content_type)

    async def make_app() -> web.Application:
        nonlocal session
        # No connection limit: the proxy must not queue where the other paths do not.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        app = web.Application()
        app.router.add_post(SPEECH_PATH, speech)
        return app

    _run_http(conn, make_app)


def serve_raw(conn: Connection, socket_path: str) -> None:
    """Length-prefixed msgpack on a Unix socket: one request frame in, one answer frame out."""
    _become_helper()
    model = load_model()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                header = await reader.readexactly(_FRAME_HEADER)
            except asyncio.IncompleteReadError:
                break  # the client is done
            args = msgpack.unpackb(await reader.readexactly(int.from_bytes(header, "big")))
            writer.write(pack_frame({"audio": speak(model, args)}))
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(client, socket_path)
        conn.send(socket_path)
        await server.serve_forever()

    event_loop.run(main())  # the loop lemonade itself runs on, so only the architecture differs


def pack_frame(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return len(body).to_bytes(_FRAME_HEADER, "big") + body


# --------------------------------------------------------------------------- plumbing


def _become_helper() -> None:
    # Ctrl-C reaches the whole process group: the benchmark stops its helpers itself, and a
    # KeyboardInterrupt traceback from each of them would only bury its message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal()  # dies with the benchmark even if that is SIGKILLed


def _run_http(conn: Connection, make_app: Callable[[], Awaitable[web.Application]]) -> None:
    """Serve the app on a free loopback port, report the port, run until terminated."""

    async def main() -> None:
        # No access log, as in the supervisor (supervisor/server.py): it would cost every path.
        runner = web.AppRunner(await make_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        conn.send(runner.addresses[0][1])
        await asyncio.Event().wait()  # SIGTERM (default action) ends the process

    event_loop.run(main())  # the loop lemonade itself runs on, so only the architecture differs


class Helper:
    """One helper server in a spawned process; ``address`` is the port or socket it reported."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=False)
        self.name = target.__name__
        self.proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
        self.proc.start()
        theirs.close()  # the child has its own copy; ours then sees EOF if it dies
        try:
            self.address: Any = self._wait_ready(ours)
        except BaseException:
            self.stop()
            raise
        finally:
            ours.close()

    def _wait_ready(self, conn: Connection) -> Any:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not conn.poll(0.1):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"helper {self.name} did not start "
                                 f"(exit code {self.proc.exitcode})")
        try:
            return conn.recv()
        except EOFError:
            raise SystemExit(f"helper {self.name} died while starting "
                             f"(exit code {self.proc.exitcode})") from None

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
