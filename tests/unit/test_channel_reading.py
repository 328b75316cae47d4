"""The supervisor's read side of a worker socket, against a hand-driven peer: a frame that
starts must finish within the body deadline, and a burst of frames in one read all arrive."""

from __future__ import annotations

import asyncio
import socket

import pytest

from supervisor import channel as channel_module
from supervisor.channel import Channel
from workers.protocol import Chunk, End, encode


async def _channel_and_peer() -> tuple[Channel, socket.socket, list[str]]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    broken: list[str] = []
    return Channel("m", reader, writer, on_broken=broken.append), theirs, broken


async def test_a_frame_that_stops_halfway_breaks_the_channel_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(channel_module, "FRAME_BODY_DEADLINE_S", 0.2)
    channel, peer, broken = await _channel_and_peer()
    try:
        peer.sendall((100).to_bytes(4, "big") + b"\x81" * 10)  # 10 of 100 promised bytes
        for _ in range(100):
            if broken:
                break
            await asyncio.sleep(0.02)
        assert broken and "did not arrive within 0.2s" in broken[0]
        assert not channel.is_open
    finally:
        channel.close()
        peer.close()


async def test_a_burst_of_frames_in_one_read_reaches_the_call_in_order() -> None:
    channel, peer, broken = await _channel_and_peer()
    try:
        call = channel.call("speech", {}, timeout_s=5)
        await call.start()
        burst = b"".join(encode(Chunk(id=1, seq=i, data=bytes([i]))) for i in range(50))
        peer.sendall(burst + encode(End(id=1, result={"n": 50})))
        assert await call.collect() == [bytes([i]) for i in range(50)]
        assert call.result == {"n": 50} and not broken
    finally:
        channel.close()
        peer.close()
