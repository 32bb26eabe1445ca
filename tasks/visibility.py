"""Keep the messages a living worker holds invisible to redelivery.

Celery's Redis transport redelivers an unacknowledged message once it is
older than ``visibility_timeout`` (celery#5935: long tasks run twice). We set
that timeout short, so the shard of a volunteer that died comes back within
seconds, and let every living worker push the clock of the messages it holds
forward: kombu keeps that clock as the message's score in the
``unacked_index`` sorted set. The heartbeat runs in the worker's main process
(which owns the messages), so it stops exactly when the worker dies.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import bootsteps
from celery.worker import state

from broker.client import redis_client
from broker.settings import Settings
from broker.throttle import flush_all

log = logging.getLogger("crowdtrain.visibility")
DEFAULT_INDEX_KEY = "unacked_index"


class KeepVisible(bootsteps.StartStopStep):
    """Worker bootstep: refresh held messages every visibility_timeout / 4 seconds."""

    label = "crowdtrain keep-visible"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        app = worker.app
        options = app.conf.broker_transport_options or {}
        index = options.get("unacked_index_key", DEFAULT_INDEX_KEY)
        period = float(options.get("visibility_timeout", 60)) / 4
        settings: Settings = app.settings
        client = redis_client(settings)
        self._thread = threading.Thread(
            target=self._beat, args=(client, index, period), name="keep-visible", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()

    def _beat(self, client: Any, index: str, period: float) -> None:
        while not self._stop.wait(period):
            flush_all()  # the counts of rate-limited warnings (junk messages dropped) whose period is over
            tags = held_delivery_tags()
            if not tags:
                continue
            try:
                client.zadd(index, dict.fromkeys(tags, time.time()), xx=True)
            except Exception as e:  # a broker blip must not kill the worker
                log.warning("could not refresh the visibility of %d messages: %s", len(tags), e)


def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker has reserved or is running."""
    tags = []
    for request in list(state.reserved_requests) + list(state.active_requests):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag:
            tags.append(tag)
    return tags
