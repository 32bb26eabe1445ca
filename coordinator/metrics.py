"""Prometheus metrics for what Flower does not export: queues, rounds, bytes, loss."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.rounds import round_record
from coordinator.store import Store
from tasks.app import AGGREGATE_QUEUE, TRAIN_QUEUE

log = logging.getLogger("crowdtrain.metrics")


class CrowdtrainCollector(Collector):
    """Reads Redis at scrape time, so every aggregator reports the same numbers."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily("crowdtrain_queue_depth", "Messages waiting per queue", labels=["queue"])
        for name, depth in self.store.queue_depths((TRAIN_QUEUE, AGGREGATE_QUEUE)).items():
            queue.add_metric([name], depth)
        yield queue
        families = {name: GaugeMetricFamily(f"crowdtrain_{name}", text, labels=["run"]) for name, text in (
            ("model_version", "Current model version"),
            ("round", "Latest round number"),
            ("round_shards", "Shards posted in the latest round"),
            ("round_accepted", "Accepted deltas in the latest round"),
            ("round_rejected", "Rejected deltas in the latest round"),
            ("round_late", "Late results in the latest round"),
            ("round_uplink_bytes", "Encoded bytes uploaded in the latest round"),
            ("round_downlink_bytes", "Model bytes fetched in the latest round"),
            ("eval_loss", "Eval loss of the latest finished round"),
        )}
        for run in self.store.runs():
            number = self.store.round_count(run)
            families["model_version"].add_metric([run], self.store.version(run))
            families["round"].add_metric([run], number)
            if not number:
                continue
            record = round_record(self.store, run, number)
            for field in ("shards", "accepted", "rejected", "late", "uplink_bytes", "downlink_bytes"):
                families[f"round_{field}"].add_metric([run], float(record.get(field) or 0))
            if record.get("eval_loss") is not None:
                families["eval_loss"].add_metric([run], float(record["eval_loss"]))
        yield from families.values()
        online = GaugeMetricFamily("crowdtrain_volunteers_known", "Volunteers that ever trained a shard")
        online.add_metric([], len(self.store.volunteers()))
        yield online


def serve_metrics(store: Store, port: int) -> None:
    """Serve /metrics on ``port`` from a background thread."""
    REGISTRY.register(CrowdtrainCollector(store))
    start_http_server(port)
    log.info("Prometheus metrics on http://0.0.0.0:%d/metrics", port)
