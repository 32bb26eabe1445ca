"""The volunteer's task, ``train_shard``, and the app a volunteer process runs.

This module imports the volunteer side only: a volunteer process never loads
coordinator code.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task

from broker.client import redis_client
from broker.settings import Settings
from tasks.app import CrowdtrainApp, make_app
from tasks.arguments import checked
from volunteer.store import VolunteerStore
from volunteer.worker import ShardRunner, VolunteerOptions


class VolunteerTask(Task):
    """Base of ``train_shard``: one ShardRunner per worker thread, made on first use (after fork).

    A runner caches model versions and keeps error-feedback residuals, which
    must never be shared between shards trained at the same time: with
    ``--pool threads`` each thread gets its own.
    """

    _local = threading.local()

    @property
    def runner(self) -> ShardRunner:
        runner: ShardRunner | None = getattr(self._local, "runner", None)
        if runner is None:
            app: CrowdtrainApp = self.app
            options: VolunteerOptions = app.conf.crowdtrain_volunteer
            runner = ShardRunner(VolunteerStore(redis_client(app.settings), options.name), options)
            self._local.runner = runner
        return runner


def volunteer_app(settings: Settings, options: VolunteerOptions) -> CrowdtrainApp:
    """The app of ``volunteer start``: pulls ``train``; its uploads announce themselves (no second task)."""
    app = make_app(settings, volunteer=True)  # no task results, kombu's own unacked keys
    app.conf.crowdtrain_volunteer = options  # who this worker is: name, device, allowed jobs
    register(app)
    return app


def register(app: CrowdtrainApp) -> None:
    """Add ``train_shard`` to ``app``."""
    app.own_tasks.add("train_shard")

    # No result is stored: a volunteer may not write (or read) the result backend.
    @app.task(name="train_shard", base=VolunteerTask, bind=True, ignore_result=True, shared=False)
    def train_shard(
        self: VolunteerTask,
        run: str,
        round: int,
        shard: int,
        shards: int,
        version: int,
        upload: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train the run's model of ``version`` on one shard; the delta goes to Redis, announced.

        The upload's key goes on ``ct:announce`` in the same transaction as the
        upload, which the aggregator drains in batches: one task per shard. A
        run with a blob store gives each job an ``upload`` slot (an object and
        its presigned PUT URL): the delta goes there, and Redis gets a pointer.
        """
        checked(run=run, round=round, shard=shard, shards=shards, version=version, upload=upload)
        return self.runner.run(run, round, shard, shards, version, upload)
