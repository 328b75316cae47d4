"""The event bus: a listener that falls behind loses the oldest events and learns how many."""

from __future__ import annotations

from supervisor.events import _QUEUE_SIZE, EventBus


async def test_a_slow_subscriber_keeps_the_newest_events_and_is_told_what_it_lost() -> None:
    bus = EventBus()
    async with bus.subscribe() as queue:
        for i in range(_QUEUE_SIZE + 44):
            bus.publish("loaded", f"m{i}")
        assert queue.qsize() == _QUEUE_SIZE
        assert queue.get_nowait()["model"] == "m44"  # m0..m43 were dropped
        assert bus.take_dropped(queue) == 44
        assert bus.take_dropped(queue) == 0  # told once
        bus.publish("unloaded", "m0")
        assert bus.take_dropped(queue) == 0  # there was room: nothing lost


async def test_subscribers_do_not_share_their_losses() -> None:
    bus = EventBus()
    async with bus.subscribe() as slow, bus.subscribe() as fast:
        for i in range(_QUEUE_SIZE + 1):
            bus.publish("loaded", f"m{i}")
            if not fast.empty():
                fast.get_nowait()
        assert bus.take_dropped(slow) == 1
        assert bus.take_dropped(fast) == 0
    assert bus.published == _QUEUE_SIZE + 1


def test_recent_keeps_the_last_events_but_progress() -> None:
    from supervisor.events import HISTORY_SIZE, EventBus

    bus = EventBus()
    for n in range(HISTORY_SIZE + 5):
        bus.publish("loaded", f"m{n}", pid=n)
        bus.publish("progress", f"m{n}", fraction=0.5)
    recent = bus.recent()
    assert len(recent) == HISTORY_SIZE
    assert {e["event"] for e in recent} == {"loaded"}
    assert recent[0]["model"] == "m5" and recent[-1]["model"] == f"m{HISTORY_SIZE + 4}"
