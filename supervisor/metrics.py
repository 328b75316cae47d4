"""Prometheus metrics: counters fed by lifecycle events, gauges read from the slots at scrape.

Counters (loads, evictions by reason, crashes, load seconds) listen to the manager's event bus,
so the manager knows nothing about Prometheus. Gauges (state, memory, requests in flight) are
computed when ``/metrics`` is scraped, so they can never drift from the truth.

Request metrics (counts, latency, time to first byte and first token, tokens, queue wait) are
fed by the access-log middleware (``supervisor/api/access_log.py``), the chat routes and the
manager's ``on_admitted`` callback. Every label has a bounded set of values: the route is the
route's template (or ``unmatched``), never the raw path; the model is a configured model's
name or empty (a name nobody configured is never a label); the method is a standard one or
``OTHER``; the status is a number.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor.events import Event
from supervisor.lifecycle import State
from supervisor.manager import Manager
from supervisor.status import device_rows

_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
#: From a status poll (milliseconds) to a long generation or a cold load (minutes).
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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
        yield from _device_gauges(manager)
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
        self.requests = Counter(
            "lemonade_requests", "HTTP requests by route template, method, model and status",
            ["route", "method", "model", "status"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "lemonade_request_seconds",
            "Time from a request's arrival to the end of its response (a stream's last byte)",
            ["route", "model"], buckets=_REQUEST_BUCKETS, registry=self.registry,
        )
        self.first_byte_seconds = Histogram(
            "lemonade_time_to_first_byte_seconds",
            "Streamed responses: time from a request's arrival to its response headers",
            ["route", "model"], buckets=_REQUEST_BUCKETS, registry=self.registry,
        )
        self.first_token_seconds = Histogram(
            "lemonade_time_to_first_token_seconds",
            "Chat and completion streams: time from a request's arrival to the first text",
            ["route", "model"], buckets=_REQUEST_BUCKETS, registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lemonade_prompt_tokens", "Prompt tokens of finished chat and completion requests",
            ["model"], registry=self.registry,
        )
        self.completion_tokens = Counter(
            "lemonade_completion_tokens", "Tokens generated for chat and completion requests",
            ["model"], registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "lemonade_queue_wait_seconds",
            "Time a request waited to get hold of its model (a load, joining a load, a stop)",
            ["model"], buckets=_REQUEST_BUCKETS, registry=self.registry,
        )
        self.registry.register(_SlotCollector(manager))
        manager.events.listen(self._on_event)
        manager.on_admitted.append(self._on_admitted)

    def _on_admitted(self, model: str, waited_s: float) -> None:
        self.queue_wait_seconds.labels(model).observe(waited_s)

    def observe_request(self, *, route: str, method: str, model: str, status: int,
                        seconds: float, first_byte_s: float | None = None,
                        first_token_s: float | None = None) -> None:
        """One finished request (``model`` empty when it never got hold of one)."""
        method = method if method in _METHODS else "OTHER"
        self.requests.labels(route, method, model, str(status)).inc()
        self.request_seconds.labels(route, model).observe(seconds)
        if first_byte_s is not None:
            self.first_byte_seconds.labels(route, model).observe(first_byte_s)
        if first_token_s is not None:
            self.first_token_seconds.labels(route, model).observe(first_token_s)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        # A negative count would be a worker's bug; Counter.inc refuses it, and a request
        # must not fail over its bookkeeping.
        self.prompt_tokens.labels(model).inc(max(0, prompt))
        self.completion_tokens.labels(model).inc(max(0, completion))

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


def _device_gauges(manager: Manager) -> Iterator[GaugeMetricFamily]:
    """Per device (cpu, each GPU or declared device): total, budget, used by whom, free."""
    rows = device_rows(manager)
    families = {
        "total_bytes": GaugeMetricFamily("lemonade_device_total_bytes",
                                         "Memory of the device (RAM for cpu)", labels=["device"]),
        "budget_bytes": GaugeMetricFamily("lemonade_device_budget_bytes",
                                          "What models may use on the device now",
                                          labels=["device"]),
        "free_bytes": GaugeMetricFamily("lemonade_device_free_bytes",
                                        "Free memory on the device", labels=["device"]),
    }
    used = GaugeMetricFamily("lemonade_device_used_bytes",
                             "Memory used on the device by our models or by other programs",
                             labels=["device", "by"])
    for row in rows:
        if row.get("unit") == "thousandths":
            continue  # a Ray node's resource (an accelerator count), not bytes
        for key, family in families.items():
            if row[key] is not None:
                family.add_metric([row["name"]], row[key])
        used.add_metric([row["name"], "models"], row["used_by_models_bytes"])
        if row["used_by_others_bytes"] is not None:
            used.add_metric([row["name"], "others"], row["used_by_others_bytes"])
    yield from families.values()
    yield used
