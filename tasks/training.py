"""The volunteer's task, ``train_shard``, and the app a volunteer process runs.

This module imports the volunteer side only: a volunteer process never loads
coordinator code.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Task, bootsteps
from celery.worker.request import Request

from broker.client import redis_client
from broker.routing import unservable
from broker.settings import Settings
from tasks.app import CrowdtrainApp, make_app
from tasks.arguments import checked
from volunteer.guest import Watch
from volunteer.store import VolunteerStore
from volunteer.trainer import preload
from volunteer.worker import ShardRunner, VolunteerOptions

log = logging.getLogger("crowdtrain.volunteer")


class VolunteerTask(Task):
    """Base of ``train_shard``: one ShardRunner per worker thread, made on first use (after fork).

    A runner caches model versions and keeps error-feedback residuals, which
    must never be shared between shards trained at the same time: with
    ``--pool threads`` each thread gets its own.
    """

    _local = threading.local()
    Request = "tasks.training:VolunteerRequest"  # acknowledged after the queue gate read the board

    @property
    def runner(self) -> ShardRunner:
        runner: ShardRunner | None = getattr(self._local, "runner", None)
        if runner is None:
            app: CrowdtrainApp = self.app
            options: VolunteerOptions = app.conf.crowdtrain_volunteer
            runner = ShardRunner(VolunteerStore(redis_client(app.settings), options.name), options)
            self._local.runner = runner
        return runner


class Preload(bootsteps.Step):
    """Worker bootstep: what the first shard would import, imported before the pool starts.

    Celery makes every worker step before it creates any (the prefork pool
    forks its children when it is created), so this runs in the main process
    first: the children inherit ``torch._dynamo`` (``volunteer.trainer.preload``),
    and a child's first shard, and the first after a child is replaced, does
    not pay 1 to 2 s for it. With the solo or threads pool the import moves
    from the first shard to the worker's start.
    """

    label = "crowdtrain preload"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        preload()


class QueueGate(bootsteps.StartStopStep):
    """Consumer bootstep: the volunteer consumes only the queues it may take now.

    None while it is paused, so it takes no new shard: the watch
    (``volunteer.guest.Watch``, in this main process) says when the pause
    begins and ends. And none that a failed capability claim rules out: a
    trainer refused a lease for one writes the run's queue on the board
    (``ShardRunner._withdraw``), and this step reads the board before the
    refused task is acknowledged (``VolunteerRequest``), so the next message
    fetched is never one of those; they come back when the trainer's next
    challenge is due. Queues are cancelled and added again in the consumer's
    own loop, as Celery's control commands do. A worker online that consumes
    nothing is what ``coordinator status`` shows as paused.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "crowdtrain queue-gate"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.queues: list[str] = []
        self.consumer: Any = None
        self.watch: Watch | None = None
        self._timer: Any = None  # the entry that settles again when the first withdrawal ends

    def start(self, consumer: Any) -> None:
        watch: Watch | None = consumer.app.conf.get("crowdtrain_watch")
        if watch is None:
            return
        if not self.queues:  # the first start: later ones (after a broker blip) may find them cancelled
            self.queues = [queue.name for queue in consumer.task_consumer.queues]
        self.consumer, self.watch = consumer, watch
        consumer.app.conf.crowdtrain_gate = self
        watch.on_change = lambda paused: consumer.call_soon(self.settle)
        self.settle()

    def after_task(self) -> None:
        """A task ended: act on what it wrote on the board, before its message is acknowledged."""
        if threading.current_thread() is threading.main_thread():
            self.settle()  # the consumer's own loop (prefork, solo)
        else:
            self.consumer.call_soon(self.settle)  # a pool thread

    def settle(self) -> None:
        """Consume exactly the queues wanted now (in the consumer's loop)."""
        watch, consumer = self.watch, self.consumer
        if watch is None or consumer is None:
            return
        now = time.monotonic()
        ruled_out: dict[str, str] = {}
        withdrawn = watch.guest.board.withdrawn(now)
        for queue, reason, _ in withdrawn:
            ruled_out.update(dict.fromkeys(unservable(self.queues, queue, reason), reason))
        for queue in self.queues:
            consuming = consumer.task_consumer.consuming_from(queue)
            take = not watch.reasons and queue not in ruled_out
            if take and not consuming:
                consumer.add_task_queue(queue)
            elif consuming and not take:
                if queue in ruled_out:
                    log.info("not taking %s: %s", queue, ruled_out[queue])
                consumer.cancel_task_queue(queue)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if withdrawn:
            first = min(until for _, _, until in withdrawn)
            self._timer = consumer.timer.call_after(max(first - now, 0.0) + 0.01, self.settle)


class VolunteerRequest(Request):
    """A ``train_shard`` request whose acknowledgement first lets the ``QueueGate`` read the board.

    With late acks (``tasks.app``) the next message is fetched only after this
    one is acknowledged: a queue the task found it cannot serve is cancelled
    before then.
    """

    def acknowledge(self) -> None:
        gate: QueueGate | None = self.app.conf.get("crowdtrain_gate")
        if gate is not None and not self.acknowledged:
            try:
                gate.after_task()
            except Exception:  # the queues stay as they were; the message is acknowledged all the same
                log.exception("could not settle the queues consumed")
        super().acknowledge()


def volunteer_app(settings: Settings, options: VolunteerOptions, watch: Watch | None = None) -> CrowdtrainApp:
    """The app of ``volunteer start``: pulls ``train``; its uploads announce themselves (no second task).

    With a ``watch`` (the volunteer's manners) it stops taking shards while paused, and stops
    taking a routed queue's shards while a failed capability claim rules them out (``QueueGate``).
    """
    app = make_app(settings, volunteer=True)  # no task results, kombu's own unacked keys
    app.conf.crowdtrain_volunteer = options  # who this worker is: name, device, allowed jobs
    app.steps["worker"].add(Preload)  # torch._dynamo, before the pool forks
    if watch is not None:
        app.conf.crowdtrain_watch = watch
        app.steps["consumer"].add(QueueGate)
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
