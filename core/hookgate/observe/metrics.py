"""Prometheus metrics for one gateway process, served at `GET /metrics`.

Each gateway owns its own registry (no process-global state), so tests and embedded uses can run
several gateways side by side.

The workers of one supervisor are one gateway: it starts them with `PROMETHEUS_MULTIPROC_DIR`
set to a directory of its own, where prometheus_client keeps every process's values, and each
worker's `/metrics` renders the sum over that directory (gauges as their `multiprocess_mode`
says: `livesum` for what each process holds, `livemax` for what any process sees).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Read by prometheus_client when it is imported; the supervisor sets it for its workers.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ingress_requests = Counter(
            "hookgate_ingress_requests",
            "Webhook requests received, by source and the status answered",
            ["source", "status"],
            registry=self.registry,
        )
        self.ingress_rejections = Counter(
            "hookgate_ingress_rejections",
            "Webhooks refused by access rules or signature verification, by source and reason",
            ["source", "reason"],
            registry=self.registry,
        )
        self.events_stored = Counter(
            "hookgate_events_stored",
            "Events stored in JetStream (duplicates not counted), by source",
            ["source"],
            registry=self.registry,
        )
        self.events_stored_late = Counter(
            "hookgate_events_stored_late",
            "Events stored after their request was answered 503 (publish timeout), by source: a "
            "client that retries with the same id makes no second event",
            ["source"],
            registry=self.registry,
        )
        self.events_duplicate = Counter(
            "hookgate_events_duplicate",
            "Events answered 2xx but not stored again because their id was seen, by source",
            ["source"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "hookgate_delivery_attempts",
            "Delivery attempts, by endpoint and outcome (succeeded, retrying, failed, dead)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "hookgate_deliveries",
            "Deliveries that ended, by endpoint and outcome (succeeded, failed, dead)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "hookgate_dead_letters",
            "Deliveries put in the dead-letter stream (failed or dead), by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.attempt_latency = Histogram(
            "hookgate_delivery_attempt_seconds",
            "Time from sending an attempt to its response or error, by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

        self.deferrals = Counter(
            "hookgate_delivery_deferrals",
            "Deliveries put off by a rate limit, an open circuit or a full lane (not counted as attempts)",
            ["endpoint", "reason"],
            registry=self.registry,
        )

        self.backlog = Gauge(
            "hookgate_endpoint_backlog",
            "Deliveries waiting for an endpoint (pending plus in flight), from its JetStream consumer",
            ["endpoint"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.circuit_open = Gauge(
            "hookgate_endpoint_circuit_open",
            "1 while an endpoint's circuit breaker is open or half-open, else 0",
            ["endpoint"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.endpoint_disabled = Gauge(
            "hookgate_endpoint_disabled",
            "1 while an endpoint is disabled, else 0",
            ["endpoint"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )

        self.connections_open = Gauge(
            "hookgate_http_connections_open",
            "HTTP connections open now",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "hookgate_http_connections_refused",
            "HTTP connections closed by the connection limit: evicted (waited longest for its client),"
            " busy (all connections processing) or accept_error (out of file descriptors)",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hookgate_events_in_flight",
            "Events (webhooks and internal publishes) being verified and stored (see server.max_in_flight)",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.overloaded = Counter(
            "hookgate_overload_rejections",
            "Requests answered 503 by admission control, by reason (in_flight, unrouted) or dropped"
            " because the client had gone (client_gone)",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        shared = os.environ.get(MULTIPROC_DIR_ENV)
        if not shared:
            return generate_latest(self.registry)
        # Every worker's values, read from the supervisor's directory at each scrape.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=shared)
        return generate_latest(registry)


def process_exited(directory: str, pid: int) -> None:
    """Drop an exited worker's live gauges from the shared directory; its counters stay, so the
    gateway's totals never go back."""
    mark_process_dead(pid, directory)
