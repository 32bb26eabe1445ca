"""The trusted aggregator's tasks, ``aggregate_round`` and ``merge_slices``, and its app.

Uploads are not validated by a task: volunteers announce them on a list that
the aggregator's intake thread drains in batches (``coordinator.rounds.announcements``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import Task

from broker.client import redis_client
from broker.settings import Settings
from coordinator.merging.aggregator import Aggregator
from coordinator.store import Store
from tasks.app import CrowdtrainApp, make_app
from tasks.arguments import checked


class AggregatorTask(Task):
    """Base of the aggregator's task: the process's Aggregator, shared with its intake thread."""

    @cached_property
    def aggregator(self) -> Aggregator:
        app: CrowdtrainApp = self.app
        shared: Aggregator | None = app.conf.get("crowdtrain_aggregator")
        if shared is not None:
            return shared
        settings = app.settings
        return Aggregator(
            Store(redis_client(settings)),
            settings.home,
            keep_versions=settings.keep_versions,
            cache_bytes=settings.merge_cache_mb << 20,
        )


def aggregator_app(settings: Settings, aggregator: Aggregator | None = None) -> CrowdtrainApp:
    """The app of ``coordinator aggregator``: the only consumer of ``aggregate``.

    ``aggregator``: the one its intake thread validates with, so both share a run's cached context.
    """
    app = make_app(settings)
    app.conf.crowdtrain_aggregator = aggregator
    register(app)
    return app


def register(app: CrowdtrainApp) -> None:
    """Add ``aggregate_round`` and ``merge_slices`` to ``app``."""
    app.own_tasks.update(("aggregate_round", "merge_slices"))

    @app.task(name="aggregate_round", base=AggregatorTask, bind=True, shared=False)
    def aggregate_round(self: AggregatorTask, run: str, round: int) -> dict[str, Any]:
        """Merge the round into the next model version, exactly once."""
        checked(run=run, round=round)
        summary = self.aggregator.aggregate(run, round)
        if summary is None:
            return {"run": run, "round": round, "outcome": "not due or already aggregated"}
        keep = ("status", "model_version", "accepted", "train_loss", "eval_loss", "seconds")
        return {"run": run, "round": round, **{k: summary.get(k) for k in keep}}

    @app.task(name="merge_slices", base=AggregatorTask, bind=True, shared=False)
    def merge_slices(self: AggregatorTask, run: str, round: int) -> dict[str, Any]:
        """Merge free slices of a sliced round another aggregator planned (``coordinator.merging.split``)."""
        checked(run=run, round=round)
        return {"run": run, "round": round, "slices": self.aggregator.merge_slices(run, round)}
