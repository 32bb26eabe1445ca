"""Prometheus metrics for what Flower does not export: queues, rounds, bytes, loss.

The collector reads Redis at scrape time, so every aggregator that serves
``/metrics`` reports the same numbers. Metric names and labels:

| metric | labels | meaning |
| --- | --- | --- |
| ``crowdtrain_queue_depth`` | queue | messages waiting in ``train`` / ``aggregate`` |
| ``crowdtrain_model_version`` | run | current model version |
| ``crowdtrain_round`` | run | number of the latest round |
| ``crowdtrain_round_open`` | run | 1 while the latest round is open or aggregating |
| ``crowdtrain_round_{shards,quorum,accepted,rejected,late}`` | run | the latest round's counters |
| ``crowdtrain_round_{uplink,downlink}_bytes`` | run | bytes volunteers sent / fetched in it |
| ``crowdtrain_round_mean_delta_norm`` | run | mean L2 norm of its merged deltas, where recorded |
| ``crowdtrain_{train,eval}_loss``, ``crowdtrain_eval_accuracy`` | run | of the latest merged round |
| ``crowdtrain_{uplink,downlink}_bytes_total`` | run | counters: summed over the run's rounds in Redis |
| ``crowdtrain_volunteers_known`` | | volunteers the aggregator has a record of (first validated upload) |
| ``crowdtrain_volunteers_online`` | | those answering a Celery ping (when an app is given) |
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from coordinator.store import Store
from coordinator.views.documents import round_record

PING_INTERVAL = 15.0  # seconds between Celery pings; a scrape never waits for one
PING_TIMEOUT = 1.0
# How many rounds back to look for the latest evaluated one while a round is open.
EVAL_LOOKBACK = 3
_ROUND_GAUGES = (
    ("round_open", "1 while the latest round is open or aggregating"),
    ("round_shards", "Shards posted in the latest round"),
    ("round_quorum", "Accepted deltas the latest round needs"),
    ("round_accepted", "Accepted deltas in the latest round"),
    ("round_rejected", "Rejected deltas in the latest round"),
    ("round_late", "Results that arrived after the latest round was closed"),
    ("round_uplink_bytes", "Encoded bytes volunteers uploaded in the latest round"),
    ("round_downlink_bytes", "Model bytes volunteers fetched in the latest round"),
    ("round_mean_delta_norm", "Mean L2 norm of the deltas merged in the latest round"),
    ("train_loss", "Sample-weighted train loss of the latest merged round"),
    ("eval_loss", "Eval loss of the latest merged model"),
    ("eval_accuracy", "Eval accuracy of the latest merged model"),
)
# Counters: sums over the run's rounds still in Redis (exported with a _total suffix).
_RUN_COUNTERS = (
    ("uplink_bytes", "Encoded bytes volunteers uploaded, summed over the run's rounds"),
    ("downlink_bytes", "Model bytes volunteers fetched, summed over the run's rounds"),
)
OnlineFn = Callable[[], "set[str] | None"]

log = logging.getLogger("crowdtrain.metrics")


class OnlineVolunteers:
    """Celery node names answering a ping, refreshed by a daemon thread."""

    def __init__(self, app: Celery, interval: float = PING_INTERVAL) -> None:
        self.app = app
        self.interval = interval
        self._names: set[str] | None = None
        self._stop = threading.Event()

    def __call__(self) -> set[str] | None:
        """The names seen by the last ping; None before the first one finished."""
        return self._names

    def start(self) -> OnlineVolunteers:
        threading.Thread(target=self._loop, daemon=True, name="metrics-ping").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> set[str]:
        """Ping now; node ``alice@host`` counts as ``alice``."""
        try:
            replies = self.app.control.ping(timeout=PING_TIMEOUT) or []
        except Exception as e:  # an unreachable broker means nobody is online
            log.warning("ping for volunteers online failed: %s", e)
            replies = []
        self._names = {node.split("@", 1)[0] for reply in replies for node in reply}
        return self._names

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)


class CrowdtrainCollector(Collector):
    """Reads Redis at scrape time; ``online`` (optional) says who answers pings."""

    def __init__(self, store: Store, online: OnlineFn | None = None) -> None:
        self.store = store
        self.online = online

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        queue = GaugeMetricFamily("crowdtrain_queue_depth", "Messages waiting per queue", labels=["queue"])
        for name, depth in self.store.queue_depths().items():
            queue.add_metric([name], depth)
        yield queue
        version = GaugeMetricFamily("crowdtrain_model_version", "Current model version", labels=["run"])
        latest = GaugeMetricFamily("crowdtrain_round", "Number of the latest round", labels=["run"])
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            name: GaugeMetricFamily(f"crowdtrain_{name}", text, labels=["run"])
            for name, text in _ROUND_GAUGES
        }
        families.update(
            {
                name: CounterMetricFamily(f"crowdtrain_{name}", text, labels=["run"])
                for name, text in _RUN_COUNTERS
            }
        )
        for run in self.store.runs():
            number = self.store.rounds.count(run)
            version.add_metric([run], self.store.version(run))
            latest.add_metric([run], number)
            for name, value in _run_values(self.store, run, number).items():
                families[name].add_metric([run], value)
        yield version
        yield latest
        yield from (family for family in families.values() if family.samples)
        yield from self._volunteers()

    def _volunteers(self) -> Iterator[GaugeMetricFamily]:
        known = set(self.store.volunteers())
        family = GaugeMetricFamily("crowdtrain_volunteers_known", "Volunteers the aggregator has a record of")
        family.add_metric([], len(known))
        yield family
        names = self.online() if self.online else None
        if names is not None:
            family = GaugeMetricFamily(
                "crowdtrain_volunteers_online", "Volunteers whose Celery worker answered the last ping"
            )
            family.add_metric([], len(known & names))
            yield family


def serve_metrics(
    store: Store,
    port: int,
    app: Celery | None = None,
    registry: CollectorRegistry = REGISTRY,
    address: str = "127.0.0.1",
) -> Any:
    """Serve /metrics on ``address:port`` (loopback by default) from a background thread."""
    # Listen first: an address in use or not of this host raises OSError with nothing started.
    server, _thread = start_http_server(port, addr=address, registry=registry)
    online = OnlineVolunteers(app).start() if app is not None else None
    registry.register(CrowdtrainCollector(store, online))
    host = f"[{address}]" if ":" in address else address
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return server


def _run_values(store: Store, run: str, number: int) -> dict[str, float]:
    """The per-run gauges: the latest round's counters, the latest evaluation, byte totals."""
    if not number:
        return {}
    record = round_record(store, run, number)
    info = store.rounds.info(run, number) or {}
    values = {
        f"round_{field}": float(record.get(field) or 0)
        for field in ("shards", "accepted", "rejected", "late", "uplink_bytes", "downlink_bytes")
    }
    values["round_open"] = float(record.get("status") in ("open", "aggregating"))
    if info.get("quorum") is not None:
        values["round_quorum"] = float(info["quorum"])
    norm = _summary(info).get("mean_delta_norm")
    if norm is not None:
        values["round_mean_delta_norm"] = float(norm)
    for back in range(min(EVAL_LOOKBACK, number)):
        evaluated = record if back == 0 else round_record(store, run, number - back)
        if evaluated.get("eval_loss") is not None:
            for field in ("train_loss", "eval_loss", "eval_accuracy"):
                if evaluated.get(field) is not None:
                    values[field] = float(evaluated[field])
            break
    up = down = 0.0
    for n in range(1, number + 1):
        round_info = store.rounds.info(run, n) or {}
        up += float(round_info.get("uplink_bytes") or 0)
        down += float(round_info.get("downlink_bytes") or 0)
    values["uplink_bytes"] = up
    values["downlink_bytes"] = down
    return values


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    raw = info.get("summary")
    return json.loads(raw) if isinstance(raw, str) else {}
