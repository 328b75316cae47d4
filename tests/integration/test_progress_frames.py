"""Byte counts in ``progress`` frames from a real worker: what ``LoadContext.progress``
reports with ``done_bytes``/``total_bytes`` reaches the supervisor's end of the socket."""

from __future__ import annotations

from tests.integration.test_worker_runtime import handshake, spawn_worker
from workers.protocol import Load, Loaded, Progress

MIB = 1024 * 1024


async def test_a_load_reports_the_bytes_it_allocates() -> None:
    async with spawn_worker() as worker:
        await handshake(worker)
        await worker.send(Load(id=3, name="s", type="tts", device="cpu",
                               options={"memory_mb": 2}))
        reports: list[Progress] = []
        while isinstance(message := await worker.recv(), Progress):
            reports.append(message)
        assert isinstance(message, Loaded)
    counted = [(p.message, p.done_bytes, p.total_bytes) for p in reports
               if p.total_bytes is not None]
    assert counted == [("allocating 2 MiB", 0, 2 * MIB), ("allocating 2 MiB", 2 * MIB, 2 * MIB)]
    assert reports[-1].done_bytes is None and reports[-1].message == "ready"
