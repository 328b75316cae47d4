"""Each phase of a load has its own deadline, and a timeout names the phase that ran out.

One setting used to bound the process start, the load, the warmup and the wait for room, so
a short deadline meant for one phase could run out in another on a busy machine. Real
synthetic workers; the slow phase is made slow for real (a silent load, a warmup slower than its
deadline, a process that cannot start in a millisecond).
"""

from __future__ import annotations

import pytest

from supervisor.errors import GatewayTimeout
from supervisor.lifecycle import State
from tests.integration.conftest import ManagerFactory
from tests.integration.test_manager import server, tts


async def test_a_silent_load_names_load_timeout(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server(load_timeout="1s") + tts("a", options={"load_seconds": 30, "progress": False}))
    with pytest.raises(GatewayTimeout, match=r"load sent no progress .* load_timeout \(1s; "
                                             r"waited \d+\.\ds\)"):
        await manager.load("a")
    assert manager.slots["a"].state is State.FAILED


async def test_a_slow_load_with_progress_outlives_a_short_load_timeout(
        make_manager: ManagerFactory) -> None:
    # The process start and the warmup have their own, generous deadlines: a busy machine
    # that takes a second to fork does not spend the load's 0.5 s.
    manager = await make_manager(
        server(load_timeout="0.5s") + tts("a", warmup=True, options={"load_seconds": 1.5}))
    await manager.load("a")
    assert manager.slots["a"].state is State.READY


async def test_a_hung_warmup_names_warmup_timeout(make_manager: ManagerFactory) -> None:
    manager = await make_manager(
        server(warmup_timeout="1s") + tts("a", warmup=True, options={"latency_ms": 60_000}))
    with pytest.raises(GatewayTimeout, match=r"warmup call did not finish within "
                                             r"warmup_timeout \(1s; waited"):
        await manager.load("a")


async def test_a_process_that_cannot_start_in_time_names_handshake_timeout(
        make_manager: ManagerFactory) -> None:
    manager = await make_manager(server(handshake_timeout="1ms", zygotes="off") + tts("a"))
    with pytest.raises(GatewayTimeout, match=r"did not start and say hello within "
                                             r"handshake_timeout \(0\.001s; waited"):
        await manager.load("a")
    assert manager.slots["a"].state is State.FAILED
