"""Task results: a volunteer stores none, and a refused write never stops the aggregator.

A volunteer's ACL user may not write Celery's result keys, and a message can
ask any task to store its result (the ``ignore_result`` header). Out of the box
the refusal (``NoPermissionError``) escapes the worker's result handling and
the worker exits; so do a full Redis (``OutOfMemoryError``) and a read-only
replica on the trusted side. So a volunteer's app has no result backend at all
(``DisabledBackend``: storing is a no-op), and every other app's Redis backend
logs a write the server refuses and goes on: a result is a courtesy to whoever
looks, round state lives in crowdtrain's own keys.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.backends.base import DisabledBackend
from celery.backends.redis import RedisBackend, SentinelBackend

from broker.throttle import throttle

log = logging.getLogger("crowdtrain.results")
throttle(log.name)

__all__ = ["DisabledBackend", "GuardedRedisBackend", "GuardedSentinelBackend"]


class GuardedRedisBackend(RedisBackend):
    """Celery's Redis result backend: a result the server refuses (full, not permitted) is logged."""

    def store_result(
        self, task_id: Any, result: Any, state: Any, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        try:
            return super().store_result(task_id, result, state, traceback, request, **kwargs)
        except redis.exceptions.ResponseError as e:  # OOM, NOPERM, READONLY, MISCONF: the server said no
            log.warning("did not store the %s result of task %s: Redis refused it (%s)", state, task_id, e)
            return result


class GuardedSentinelBackend(GuardedRedisBackend, SentinelBackend):
    """The same behind Redis Sentinel: Celery's sentinel backend, which follows the promoted primary."""
