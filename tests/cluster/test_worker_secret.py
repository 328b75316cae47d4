"""The TCP handshake that replaces the Unix socket's peer check for workers on Ray nodes.

No cluster needed: ``RayBackend._accept`` is driven with a real listener on loopback and a
stand-in for the actor handle. A connection without the worker's secret, with a wrong one,
or with the right one but another pid is closed and the wait goes on; the worker's own hello
is the one accepted. A worker that dies before connecting is a 502 naming its exit and last
output, and none at all is a 504 at the handshake deadline.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")

from supervisor.cluster import nodes  # noqa: E402
from supervisor.cluster.ray_backend import RayBackend  # noqa: E402
from supervisor.config import Settings  # noqa: E402
from supervisor.errors import GatewayTimeout, WorkerFailed  # noqa: E402
from workers.protocol import PROTOCOL_VERSION, Hello, encode  # noqa: E402

TOKEN = "s3cret-for-this-worker"
PID = 4242


class FakeHandle:
    """What ``_accept`` uses of ``RayWorkerHandle``."""

    def __init__(self) -> None:
        self.pid = PID
        self.node = nodes.Node("n1", "id", "127.0.0.1", True)
        self.tail: deque[str] = deque(["loading weights", "Killed"])
        self.exit = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def fetch_tail(self) -> None:
        return None

    def describe_exit(self) -> str:
        return "exited with code 1"

    def last_output(self) -> str:
        return " | ".join(self.tail)


def listener() -> tuple[socket.socket, int]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


async def say_hello(port: int, token: str | None, pid: int = PID
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(Hello(v=PROTOCOL_VERSION, pid=pid, kind="synthetic", token=token)))
    await writer.drain()
    return reader, writer


async def test_only_the_hello_with_the_secret_and_the_pid_is_accepted() -> None:
    backend = RayBackend(Settings())
    sock, port = listener()
    handle = FakeHandle()
    loop = asyncio.get_running_loop()
    accepted = asyncio.ensure_future(backend._accept(sock, handle, TOKEN,  # type: ignore[arg-type]
                                                     loop.time() + 30, "m"))
    strangers = [await say_hello(port, None), await say_hello(port, "wrong"),
                 await say_hello(port, TOKEN, pid=PID + 1)]
    for reader, writer in strangers:  # each is closed by the router: we read EOF
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert not accepted.done()
    _, mine = await say_hello(port, TOKEN)
    _, writer = await asyncio.wait_for(accepted, 10)
    writer.close()
    mine.close()
    sock.close()


async def test_a_worker_that_dies_before_connecting_is_a_502_with_its_output() -> None:
    backend = RayBackend(Settings())
    sock, _port = listener()
    handle = FakeHandle()
    loop = asyncio.get_running_loop()
    accepted = asyncio.ensure_future(backend._accept(sock, handle, TOKEN,  # type: ignore[arg-type]
                                                     loop.time() + 30, "m"))
    await asyncio.sleep(0.05)
    handle.exit.set_result(1)
    with pytest.raises(WorkerFailed, match=r"on node n1 exited with code 1 before connecting: "
                                           r"loading weights \| Killed"):
        await asyncio.wait_for(accepted, 10)
    sock.close()


async def test_no_connection_is_a_504_at_the_deadline() -> None:
    backend = RayBackend(Settings())
    sock, _port = listener()
    loop = asyncio.get_running_loop()
    with pytest.raises(GatewayTimeout, match="did not connect in time"):
        await backend._accept(sock, FakeHandle(), TOKEN, loop.time() + 0.3,  # type: ignore[arg-type]
                              "m")
    sock.close()


def test_the_secret_never_shows_in_a_hello_repr() -> None:
    hello = Hello(v=PROTOCOL_VERSION, pid=1, kind="k", token=TOKEN)
    assert TOKEN not in repr(hello) and "<set>" in repr(hello)
