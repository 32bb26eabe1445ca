"""The trusted aggregator's tasks: ``validate_delta`` and ``aggregate_round``."""

from __future__ import annotations

from typing import Any

from celery import Celery

from tasks.app import AGGREGATE_QUEUE, store_for
from tasks.arguments import checked


def register(app: Celery) -> None:
    """Add ``validate_delta`` and ``aggregate_round`` to ``app``."""

    @app.task(name="validate_delta")
    def validate_delta(run: str, round: int, shard: int, token: str, volunteer: str) -> dict[str, Any]:
        """Check one volunteer's upload and count it toward the round's quorum."""
        checked(run=run, round=round, shard=shard, token=token, volunteer=volunteer)
        outcome, due = _aggregator(app).validate(run, round, shard, token, volunteer)
        if due:
            app.send_task("aggregate_round", args=[run, round], queue=AGGREGATE_QUEUE)
        return {"run": run, "round": round, "shard": shard, "volunteer": volunteer, "outcome": outcome}

    @app.task(name="aggregate_round")
    def aggregate_round(run: str, round: int) -> dict[str, Any]:
        """Merge the round into the next model version, exactly once."""
        checked(run=run, round=round)
        summary = _aggregator(app).aggregate(run, round)
        if summary is None:
            return {"run": run, "round": round, "outcome": "not due or already aggregated"}
        keep = ("status", "model_version", "accepted", "train_loss", "eval_loss", "seconds")
        return {"run": run, "round": round, **{k: summary.get(k) for k in keep}}


def _aggregator(app: Celery):
    from coordinator.aggregator import Aggregator

    aggregator = getattr(app, "_crowdtrain_aggregator", None)
    if aggregator is None:
        aggregator = Aggregator(store_for(app), app.crowdtrain_settings.home)
        app._crowdtrain_aggregator = aggregator
    return aggregator
