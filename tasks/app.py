"""The Celery app: msgpack only, queues ``train`` and ``aggregate``."""

from __future__ import annotations

import ssl
from typing import Any

import redis
from celery import Celery
from kombu import Queue

from tasks.config import RESULT_EXPIRES, Settings
from tasks.visibility import KeepVisible

TRAIN_QUEUE = "train"
AGGREGATE_QUEUE = "aggregate"
# Content types a worker will deserialize. Anything else (pickle above all) is
# refused by kombu before a single byte of it is decoded.
ACCEPT_CONTENT = ["application/x-msgpack"]


def make_app(settings: Settings) -> Celery:
    """Build the Celery app for one broker, with every crowdtrain task registered."""
    from tasks import aggregation, training  # local: both modules import this one

    app = Celery("crowdtrain", broker=settings.broker_url, backend=settings.broker_url)
    app.conf.update(_celery_config(settings))
    app.crowdtrain_settings = settings
    app.steps["worker"].add(KeepVisible)
    training.register(app)
    aggregation.register(app)
    return app


def redis_client(settings: Settings) -> redis.Redis:
    """A redis-py client for crowdtrain's own keys, on the broker's server."""
    return redis.Redis.from_url(settings.broker_url, **_redis_tls_kwargs(settings))


def store_for(app: Celery):
    """The app's ``coordinator.store.Store``, created once per process."""
    from coordinator.store import Store

    store = getattr(app, "_crowdtrain_store", None)
    if store is None:
        store = Store(redis_client(app.crowdtrain_settings))
        app._crowdtrain_store = store
    return store


def _celery_config(settings: Settings) -> dict[str, Any]:
    visibility = settings.visibility_timeout
    config: dict[str, Any] = dict(
        accept_content=ACCEPT_CONTENT,
        result_accept_content=ACCEPT_CONTENT,
        task_serializer="msgpack",
        result_serializer="msgpack",
        event_serializer="json",  # events carry only names and small reprs, read by Flower
        task_queues=[Queue(TRAIN_QUEUE), Queue(AGGREGATE_QUEUE)],
        task_default_queue=TRAIN_QUEUE,
        task_routes={
            "train_shard": {"queue": TRAIN_QUEUE},
            "validate_delta": {"queue": AGGREGATE_QUEUE},
            "aggregate_round": {"queue": AGGREGATE_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A short visibility timeout plus tasks.visibility's heartbeat: dead
        # workers' messages come back quickly, living workers' never do.
        broker_transport_options={"visibility_timeout": visibility,
                                  "unacked_restore_interval": max(1, int(visibility // 10)),
                                  "unacked_restore_throttle": 1,
                                  # a worker killed mid-sweep must not block restores for 5 minutes
                                  "unacked_mutex_expire": 10},
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
    tls = _celery_tls(settings)
    if tls:
        config["broker_use_ssl"] = tls
        config["redis_backend_use_ssl"] = tls
    return config


def _celery_tls(settings: Settings) -> dict[str, Any] | None:
    if not (settings.broker_url or "").startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.tls_ca:
        options["ssl_ca_certs"] = settings.tls_ca
    if settings.tls_cert:
        options["ssl_certfile"] = settings.tls_cert
    if settings.tls_key:
        options["ssl_keyfile"] = settings.tls_key
    return options


def _redis_tls_kwargs(settings: Settings) -> dict[str, Any]:
    tls = _celery_tls(settings)
    if not tls:
        return {}
    return {k: v for k, v in tls.items()}
