"""What the supervisor knows about its workers, shared with them through a few integers in shared memory.

The supervisor writes: how many workers there should be, how many are ready (listening, model loaded), and
the restarts so far by cause. Each worker reads them for ``/readyz`` (the whole service's readiness, not
only its own) and for ``/metrics``. With one worker there is no supervisor and no fleet.
"""

from __future__ import annotations

from multiprocessing.context import BaseContext
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

FIELDS = ("size", "ready", "died_serving", "died_starting")


class Fleet:
    """Counters shared between the supervisor and its workers (writes are the supervisor's only)."""

    def __init__(self, ctx: BaseContext, size: int) -> None:
        self.values = ctx.RawArray("q", len(FIELDS))  # int64 each; passed to the workers when they start
        self.set("size", size)

    def get(self, field: str) -> int:
        return int(self.values[FIELDS.index(field)])

    def set(self, field: str, value: int) -> None:
        self.values[FIELDS.index(field)] = value

    def add(self, field: str, value: int = 1) -> None:
        self.values[FIELDS.index(field)] += value

    def readiness(self) -> dict[str, int]:
        return {"workers_ready": self.get("ready"), "workers": self.get("size")}


class FleetCollector:
    """The fleet's numbers in Prometheus form (collected at each scrape)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("mnist_workers", "worker processes the server should have", self.fleet.get("size"))
        yield GaugeMetricFamily("mnist_workers_ready", "worker processes listening with the model loaded",
                                self.fleet.get("ready"))
        restarts = CounterMetricFamily("mnist_worker_restarts", "workers started again after they died, by when "
                                       "they died (serving: after they became ready)", labels=("died",))
        restarts.add_metric(["serving"], self.fleet.get("died_serving"))
        restarts.add_metric(["starting"], self.fleet.get("died_starting"))
        yield restarts
