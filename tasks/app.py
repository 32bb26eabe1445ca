"""The Celery app: msgpack only, queues ``train`` and ``aggregate``, no tasks of its own.

``tasks.training`` and ``tasks.aggregation`` add the volunteer's and the
aggregator's tasks; a process registers only the side it runs, so a volunteer
never imports coordinator code.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from broker.client import CONNECT_TIMEOUT, tls_options
from broker.keys import (
    AGGREGATE_QUEUE,
    RESULT_EXPIRES,
    TRAIN_QUEUE,
    TRUSTED_UNACKED,
    TRUSTED_UNACKED_INDEX,
    TRUSTED_UNACKED_MUTEX,
    UNACKED,
    UNACKED_INDEX,
    UNACKED_MUTEX,
)
from broker.sentinel import sentinel_kwargs
from broker.settings import Settings
from tasks.poison import DropMalformed, GuardedSentinelTransport, GuardedTransport
from tasks.results import DisabledBackend, GuardedRedisBackend, GuardedSentinelBackend
from tasks.visibility import KeepVisible

# Content types a worker will deserialize. Anything else (pickle above all) is
# refused by kombu before a single byte of it is decoded.
ACCEPT_CONTENT = ["application/x-msgpack"]


class CrowdtrainApp(Celery):
    """A Celery app that knows the crowdtrain settings it was built from.

    ``own_tasks``: the names of the tasks its workers run (the ``register``
    functions add them); a message naming any other task, Celery's built-ins
    included, is dropped unread (``tasks.poison.DropMalformed``).
    ``volunteer``: the app of a volunteer, which has no result backend (it may
    write no result, and a message may ask any task to store one) and keeps
    kombu's unacked bookkeeping under kombu's names. Every other app stores
    results through ``GuardedRedisBackend`` and keeps that bookkeeping under
    ``ct:trusted:*``, so the trusted side never restores an entry a volunteer wrote.
    """

    def __init__(self, settings: Settings, volunteer: bool = False) -> None:
        url = celery_url(settings)
        super().__init__("crowdtrain", broker=url, backend=url)
        # Kept here, not in app.conf: `celery inspect conf` would show it, password and all.
        self.settings = settings
        self.volunteer = volunteer
        self.own_tasks: set[str] = set()

    def _get_backend(self) -> Any:
        """Celery's hook for the result backend: none for a volunteer, a guarded Redis one otherwise."""
        if self.volunteer:
            return DisabledBackend(app=self)
        if self.settings.sentinel is not None:
            return GuardedSentinelBackend(app=self, url=celery_url(self.settings))
        return GuardedRedisBackend(app=self, url=self.settings.url)


def make_app(settings: Settings, volunteer: bool = False) -> CrowdtrainApp:
    """Build the Celery app for one broker, without tasks (``volunteer``: see CrowdtrainApp)."""
    app = CrowdtrainApp(settings, volunteer)
    app.conf.update(celery_config(settings, volunteer))
    app.steps["worker"].add(KeepVisible)
    app.steps["consumer"].add(DropMalformed)
    return app


def celery_config(settings: Settings, volunteer: bool = False) -> dict[str, Any]:
    """Celery's settings for crowdtrain: msgpack only, late acks, short visibility timeout."""
    visibility = settings.visibility_timeout
    unacked = (UNACKED, UNACKED_INDEX, UNACKED_MUTEX)
    if not volunteer:
        unacked = (TRUSTED_UNACKED, TRUSTED_UNACKED_INDEX, TRUSTED_UNACKED_MUTEX)
    config: dict[str, Any] = dict(
        broker_transport=GuardedTransport,  # drops envelopes it cannot decode (tasks.poison)
        accept_content=ACCEPT_CONTENT,
        result_accept_content=ACCEPT_CONTENT,
        task_serializer="msgpack",
        result_serializer="msgpack",
        event_serializer="json",  # events carry only names and small reprs, read by Flower
        task_queues=[Queue(TRAIN_QUEUE), Queue(AGGREGATE_QUEUE)],
        task_default_queue=TRAIN_QUEUE,
        task_routes={
            "train_shard": {"queue": TRAIN_QUEUE},
            "aggregate_round": {"queue": AGGREGATE_QUEUE},
            "merge_slices": {"queue": AGGREGATE_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A short visibility timeout plus tasks.visibility's heartbeat: dead
        # workers' messages come back quickly, living workers' never do.
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, int(visibility // 10)),
            "unacked_restore_throttle": 1,
            # a worker killed mid-sweep must not block restores for 5 minutes
            "unacked_mutex_expire": 10,
            **dict(zip(("unacked_key", "unacked_index_key", "unacked_mutex_key"), unacked, strict=True)),
        },
        result_backend_transport_options={"visibility_timeout": visibility},
        result_expires=RESULT_EXPIRES,
        result_extended=False,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        timezone="UTC",
    )
    tls = tls_options(settings)
    if tls:
        config["broker_use_ssl"] = tls
        config["redis_backend_use_ssl"] = tls
    if settings.sentinel is not None:
        options = sentinel_options(settings)
        config["broker_transport"] = GuardedSentinelTransport
        config["broker_transport_options"].update(options)
        config["result_backend_transport_options"].update(options)
    return config


def celery_url(settings: Settings) -> str:
    """The broker (and result backend) URL as Celery reads it: a sentinel:// list without its query."""
    address = settings.sentinel
    return settings.url if address is None else address.kombu_url()


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """Transport options of kombu's and Celery's Sentinel transport and backend: the master's name and
    how to log in to the sentinels (which hold none of the data nodes' users)."""
    address = settings.sentinel
    assert address is not None, "sentinel_options needs a sentinel:// broker"
    socket = {"socket_timeout": CONNECT_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    return {
        "master_name": address.master,
        "sentinel_kwargs": sentinel_kwargs(settings.sentinel_username, settings.sentinel_password, socket),
    }
