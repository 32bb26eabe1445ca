"""The volunteer's task: ``train_shard``."""

from __future__ import annotations

from typing import Any

from celery import Celery

from tasks.app import AGGREGATE_QUEUE, store_for
from tasks.arguments import checked


def register(app: Celery) -> None:
    """Add ``train_shard`` to ``app``."""

    @app.task(name="train_shard")
    def train_shard(run: str, round: int, shard: int, shards: int, version: int) -> dict[str, Any]:
        """Train the run's model of ``version`` on one shard; the delta goes to Redis."""
        checked(run=run, round=round, shard=shard, shards=shards, version=version)
        runner = _runner(app)

        def report(token: str) -> None:
            app.send_task("validate_delta", queue=AGGREGATE_QUEUE, kwargs={
                "run": run, "round": round, "shard": shard, "token": token,
                "volunteer": runner.options.name})

        return runner.run(run, round, shard, shards, version, report)


def _runner(app: Celery):
    """The process's ShardRunner, made on first use (after the worker forked)."""
    from volunteer.worker import ShardRunner

    runner = getattr(app, "_crowdtrain_runner", None)
    if runner is None:
        runner = ShardRunner(store_for(app), app.crowdtrain_volunteer)
        app._crowdtrain_runner = runner
    return runner
