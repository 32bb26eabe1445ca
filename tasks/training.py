"""The volunteer's task, ``train_shard``, and the app a volunteer process runs.

This module imports the volunteer side only: a volunteer process never loads
coordinator code.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task, bootsteps

from broker.client import redis_client
from broker.settings import Settings
from tasks.app import CrowdtrainApp, make_app
from tasks.arguments import checked
from volunteer.guest import Watch
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


class PausedTakesNothing(bootsteps.StartStopStep):
    """Consumer bootstep: while the volunteer is paused it consumes no queue, so it takes no new shard.

    The watch (``volunteer.guest.Watch``, in this main process) says when the
    pause begins and ends; the queues are cancelled and added again in the
    consumer's own loop (``call_soon``), as Celery's control commands do. A
    worker online that consumes nothing is what ``coordinator status`` shows
    as paused.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "crowdtrain paused-takes-nothing"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.queues: list[str] = []

    def start(self, consumer: Any) -> None:
        watch: Watch | None = consumer.app.conf.get("crowdtrain_watch")
        if watch is None:
            return
        if not self.queues:  # the first start: later ones (after a broker blip) may find them cancelled
            self.queues = [queue.name for queue in consumer.task_consumer.queues]

        def consume(take: bool) -> None:
            for queue in self.queues:
                if take:
                    consumer.add_task_queue(queue)
                elif consumer.task_consumer.consuming_from(queue):
                    consumer.cancel_task_queue(queue)

        watch.on_change = lambda paused: consumer.call_soon(consume, not paused)
        if watch.reasons:
            consume(False)


def volunteer_app(settings: Settings, options: VolunteerOptions, watch: Watch | None = None) -> CrowdtrainApp:
    """The app of ``volunteer start``: pulls ``train``; its uploads announce themselves (no second task).

    With a ``watch`` (the volunteer's manners) it stops taking shards while paused.
    """
    app = make_app(settings, volunteer=True)  # no task results, kombu's own unacked keys
    app.conf.crowdtrain_volunteer = options  # who this worker is: name, device, allowed jobs
    if watch is not None:
        app.conf.crowdtrain_watch = watch
        app.steps["consumer"].add(PausedTakesNothing)
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
