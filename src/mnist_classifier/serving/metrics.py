"""What ``GET /metrics`` reports, in Prometheus text format (prometheus-client).

With several worker processes each one writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (set by
the supervisor before the workers start) and any worker's ``/metrics`` adds up all of them; with one process
the values live in this process's own registry.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the route
from prometheus_client import multiprocess

from .fleet import Fleet, FleetCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# seconds: from 1 ms (a cached 28x28 upload) to 10 s (the longest a slow upload may take)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/", "/health", "/livez", "/readyz", "/metrics", "/predict", "/predict/batch", "/docs", "/openapi.json")


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The server's counters, histograms and gauges."""

    def __init__(self, model: str, dataset: str, version: str, backend: str, fleet: Fleet | None = None) -> None:
        self.fleet = fleet
        # several processes: values go to the shared folder and are collected at scrape time; one process:
        # a registry of its own, so that two apps in one process (tests) do not collide
        self.registry = None if multiprocess_mode() else CollectorRegistry()
        reg = {"registry": self.registry}
        self.requests = Counter("mnist_requests", "HTTP requests answered, by route and status",
                                ("route", "status"), **reg)
        self.latency = Histogram("mnist_request_duration_seconds", "time from request to the end of the answer",
                                 ("route",), buckets=LATENCY_BUCKETS, **reg)
        self.batch_size = Histogram("mnist_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, **reg)
        self.images = Counter("mnist_images_classified", "images classified", **reg)
        self.queue = Gauge("mnist_queue_depth", "images waiting for a forward pass", multiprocess_mode="livesum", **reg)
        self.in_flight = Gauge("mnist_requests_in_flight", "requests being answered", multiprocess_mode="livesum",
                               **reg)
        self.refusals = Counter("mnist_refused_connections", "connections refused at the edge before the app saw a "
                                "request, by reason (timeouts, sizes, the connection cap)", ("reason",), **reg)
        self.overloaded = Counter("mnist_overloaded_requests", "requests answered 503 because the queue was full", **reg)
        info = Gauge("mnist_model_info", "the model being served (value 1)", ("model", "dataset", "version", "backend"),
                     multiprocess_mode="max", **reg)
        info.labels(model, dataset, version, backend).set(1)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values, whatever paths clients try
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def observe_batch(self, size: int, queued: int) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)
        self.queue.set(queued)

    def render(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if self.fleet is not None:
            registry.register(FleetCollector(self.fleet))
        return generate_latest(registry)
