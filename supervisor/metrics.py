"""Prometheus metrics: counters fed by lifecycle events, gauges read from the slots at scrape.

Counters (loads, evictions by reason, crashes, load seconds) listen to the manager's event bus,
so the manager knows nothing about Prometheus. Gauges (state, memory, requests in flight) are
computed when ``/metrics`` is scraped, so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor.events import Event
from supervisor.lifecycle import State
from supervisor.manager import Manager

_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class _SlotCollector(Collector):
    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        manager = self._manager
        manager.refresh_memory()
        slots = list(manager.slots.values())
        loaded = GaugeMetricFamily("lemonade_loaded_models", "Models with a ready worker process")
        loaded.add_metric([], sum(1 for s in slots if s.state is State.READY))
        yield loaded
        state = GaugeMetricFamily(
            "lemonade_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        memory = GaugeMetricFamily(
            "lemonade_model_memory_bytes", "Measured memory of each model's worker",
            labels=["model", "kind"],
        )
        in_flight = GaugeMetricFamily(
            "lemonade_model_in_flight", "Requests holding each model", labels=["model"]
        )
        for slot in slots:
            for s in State:
                state.add_metric([slot.name, s.value], 1.0 if slot.state is s else 0.0)
            memory.add_metric([slot.name, "rss"], slot.rss_bytes)
            memory.add_metric([slot.name, "vram"], slot.vram_bytes)
            in_flight.add_metric([slot.name], slot.in_flight)
        yield state
        yield memory
        yield in_flight
        budget = GaugeMetricFamily("lemonade_memory_budget_bytes", "The memory budget (0 = none)")
        budget.add_metric([], manager.memory_budget_bytes or 0)
        yield budget
        zygotes = GaugeMetricFamily(
            "lemonade_zygote_memory_bytes",
            "RSS of each kind's zygote (imported modules its forked workers share)",
            labels=["kind"],
        )
        for row in manager.zygotes.describe() if manager.zygotes is not None else []:
            zygotes.add_metric([row["kind"]], row["rss_bytes"])
        yield zygotes


class Metrics:
    def __init__(self, manager: Manager) -> None:
        self.registry = CollectorRegistry()
        self.loads = Counter(
            "lemonade_loads", "Model loads by outcome", ["model", "outcome"], registry=self.registry
        )
        self.evictions = Counter(
            "lemonade_evictions", "Unloads by reason", ["model", "reason"], registry=self.registry
        )
        self.starts = Counter(
            "lemonade_worker_starts", "Worker processes started, by how (fork or spawn)",
            ["model", "how"], registry=self.registry,
        )
        self.crashes = Counter(
            "lemonade_worker_crashes", "Workers that exited unexpectedly", ["model"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "lemonade_load_seconds", "Time from load start to ready", ["model"],
            buckets=_LOAD_BUCKETS, registry=self.registry,
        )
        self.registry.register(_SlotCollector(manager))
        manager.events.listen(self._on_event)

    def _on_event(self, event: Event) -> None:
        kind, model = event["event"], event["model"]
        if kind == "loaded":
            self.loads.labels(model, "success").inc()
            self.load_seconds.labels(model).observe(event["load_seconds"])
        elif kind == "load_failed":
            self.loads.labels(model, "failure").inc()
        elif kind == "unloaded":
            self.evictions.labels(model, event["reason"]).inc()
        elif kind == "crashed":
            self.crashes.labels(model).inc()
        elif kind == "spawned":
            self.starts.labels(model, event.get("how", "spawn")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
