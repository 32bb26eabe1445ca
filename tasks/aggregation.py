"""The trusted aggregator's tasks, ``validate_delta`` and ``aggregate_round``, and its app."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import Task

from broker.client import redis_client
from broker.keys import AGGREGATE_QUEUE
from broker.settings import Settings
from coordinator.aggregator import Aggregator
from coordinator.store import Store
from tasks.app import CrowdtrainApp, make_app
from tasks.arguments import checked

# An upload to an asynchronous run that arrives while its buffer is merged asks again this
# often, this many times (a merge takes seconds; the watcher sweeps up anything left after).
WAIT_SECONDS = 0.5
MAX_WAITS = 600


class AggregatorTask(Task):
    """Base of the aggregator's tasks: one Aggregator per worker process, made on first use."""

    @cached_property
    def aggregator(self) -> Aggregator:
        app: CrowdtrainApp = self.app
        settings = app.settings
        return Aggregator(Store(redis_client(settings)), settings.home, keep_versions=settings.keep_versions)


def aggregator_app(settings: Settings) -> CrowdtrainApp:
    """The app of ``coordinator aggregator``: the only consumer of ``aggregate``."""
    app = make_app(settings)
    register(app)
    return app


def register(app: CrowdtrainApp) -> None:
    """Add ``validate_delta`` and ``aggregate_round`` to ``app``."""

    @app.task(name="validate_delta", base=AggregatorTask, bind=True)
    def validate_delta(
        self: AggregatorTask, run: str, round: int, shard: int, token: str, volunteer: str, attempt: int = 0
    ) -> dict[str, Any]:
        """Check one volunteer's upload and count it toward the round's quorum."""
        checked(run=run, round=round, shard=shard, token=token, volunteer=volunteer, attempt=attempt)
        verdict = self.aggregator.validate(run, round, shard, token, volunteer)
        if verdict.outcome == "wait" and attempt < MAX_WAITS:  # an asynchronous buffer is being merged
            kwargs = {"run": run, "round": round, "shard": shard, "token": token, "volunteer": volunteer}
            app.send_task(
                "validate_delta",
                queue=AGGREGATE_QUEUE,
                kwargs={**kwargs, "attempt": attempt + 1},
                countdown=WAIT_SECONDS,
            )
        if verdict.due:  # the round it counted in: in an asynchronous run, the open buffer
            merge = round if verdict.counted_in is None else verdict.counted_in
            app.send_task("aggregate_round", args=[run, merge], queue=AGGREGATE_QUEUE)
        if verdict.retry is not None:  # a failed shard goes back on the queue for someone else
            app.send_task("train_shard", queue=verdict.queue, kwargs=verdict.retry, ignore_result=True)
        return {
            "run": run,
            "round": round,
            "shard": shard,
            "volunteer": volunteer,
            "outcome": verdict.outcome,
        }

    @app.task(name="aggregate_round", base=AggregatorTask, bind=True)
    def aggregate_round(self: AggregatorTask, run: str, round: int) -> dict[str, Any]:
        """Merge the round into the next model version, exactly once."""
        checked(run=run, round=round)
        summary = self.aggregator.aggregate(run, round)
        if summary is None:
            return {"run": run, "round": round, "outcome": "not due or already aggregated"}
        keep = ("status", "model_version", "accepted", "train_loss", "eval_loss", "seconds")
        return {"run": run, "round": round, **{k: summary.get(k) for k in keep}}
