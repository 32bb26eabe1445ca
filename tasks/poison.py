"""Malformed messages are logged and dropped; no message can stop a worker.

Anyone who may push to ``train`` or ``aggregate`` (every volunteer) can push
bytes that are not a kombu envelope, or a valid envelope around a body that is
not a task. Out of the box either kills the worker that reads it ("Unrecoverable
error"), and a message that was delivered is restored to its queue when the
worker dies, so every restart dies on it again. Two guards stop that:

- ``GuardedTransport`` (the broker transport of every crowdtrain app): an
  envelope that does not decode is dropped where kombu pops it, before it is
  delivered or remembered for redelivery.
- ``DropMalformed`` (a consumer bootstep): a delivered task message whose
  headers or msgpack body do not have the shape of a Celery task is acked
  (dropped) with a log line; so is one that makes Celery's own handling raise.

The same transport also keeps a volunteer alive when one of kombu's Lua scripts
is refused by its least-privilege ACL (after a Redis restart the scripts it may
run with EVALSHA are gone until the aggregator loads them again): the restore
of other workers' unacked messages and the periodic binding refresh are
skipped, and a queue binding at start-up is made without the script.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import bootsteps
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

log = logging.getLogger("crowdtrain.poison")

MSGPACK = "application/x-msgpack"
# What a malformed envelope or body raises while kombu or Celery decodes it.
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError)
# Header fields Celery's request reads, and the types it can survive.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "task": (str,),
    "retries": (int,),
    "eta": (str, type(None)),
    "expires": (str, type(None)),
    "timelimit": (list, tuple, type(None)),
    "root_id": (str, type(None)),
    "parent_id": (str, type(None)),
    "group": (str, type(None)),
    "origin": (str, type(None)),
}


# A kombu Lua script that a least-privilege volunteer may only EVALSHA, gone after a Redis restart.
SCRIPT_REFUSED = (redis.exceptions.NoPermissionError, redis.exceptions.NoScriptError)


class GuardedQoS(kombu_redis.QoS):
    """kombu's QoS whose restore of unacked messages survives a refused script."""

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        try:
            super().restore_visible(start, num, interval)
        except redis.exceptions.NoPermissionError as e:
            log.warning("skipped restoring unacked messages (not permitted: %s); the aggregator does it", e)


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel that drops envelopes it cannot decode."""

    QoS = GuardedQoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except MALFORMED as e:
            log.warning("dropped a malformed message from the queue: %s", _describe(e))
            raise Empty() from None

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)
        except MALFORMED as e:
            log.warning("dropped a malformed message from %s: %s", queue, _describe(e))
            raise Empty() from None

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        """Bind a queue; if kombu's binding script is refused (a Redis restart forgot it, and a
        volunteer may not load scripts), make the same two writes without it."""
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except SCRIPT_REFUSED as e:
            key = self.keyprefix_queue % (exchange,)
            member = self.sep.join([routing_key or "", pattern or "", queue or ""])
            deadline = int(time.time() * 1000) + self._binding_ttl(queue)
            with self.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.sadd(key, member)
                pipe.zadd(self._script_binding_deadlines, {exchange: deadline}, gt=True)
                pipe.execute()
            log.warning("bound %s without kombu's script (%s); the aggregator reloads it", queue, e)

    def maybe_refresh_binding_expiry(self) -> None:
        """kombu's periodic binding refresh and sweep: skipped (not fatal) while its scripts are refused."""
        try:
            super().maybe_refresh_binding_expiry()
        except SCRIPT_REFUSED as e:
            log.warning("skipped refreshing queue bindings (%s); the aggregator reloads the scripts", e)


class GuardedTransport(kombu_redis.Transport):
    """The Redis transport with ``GuardedChannel``."""

    Channel = GuardedChannel


class DropMalformed(bootsteps.StartStopStep):
    """Consumer step: wrap every task strategy so a malformed message is dropped, not fatal."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "crowdtrain drop-malformed"

    def start(self, c: Any) -> None:
        # Tasks.start rebuilt the strategies (also after a reconnect); the
        # task handler looks them up per message, so wrapping in place is enough.
        for name, strategy in list(c.strategies.items()):
            if not getattr(strategy, "crowdtrain_guarded", False):
                c.strategies[name] = guarded(name, strategy)


def guarded(name: str, strategy: Callable[..., Any]) -> Callable[..., Any]:
    """``strategy`` that first checks the message's shape and never lets a malformed one raise."""

    def guarded_strategy(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        problem = malformed_task_message(message)
        if problem is None:
            try:
                return strategy(message, body, *args, **kwargs)
            except (InvalidTaskError, ContentDisallowed, DecodeError):
                raise  # Celery reports and drops these itself
            except MALFORMED as e:
                problem = _describe(e)
        log.warning("dropped a malformed %s message: %s", name, problem)
        _drop(message)
        return None

    guarded_strategy.crowdtrain_guarded = True  # type: ignore[attr-defined]
    return guarded_strategy


def malformed_task_message(message: Any) -> str | None:
    """Why a delivered message is not a Celery task message we can run, or None."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        return "headers are not a map"
    for field, types in _HEADER_TYPES.items():
        if field in headers and not isinstance(headers[field], types):
            return f"header {field!r} has the wrong type"
    if not isinstance(headers.get("id"), str):
        return "no task id"
    if message.content_type != MSGPACK:
        return None  # not ours to judge: Celery refuses other content types unread
    try:
        body = message.decode()
    except Exception as e:  # msgpack raises several unrelated types on garbage
        return f"body does not decode ({_describe(e)})"
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        return "body is not [args, kwargs, embed]"
    if not all(isinstance(key, str) for key in kwargs):
        return "keyword argument names are not text"
    return None


def _drop(message: Any) -> None:
    try:
        message.ack()
    except Exception as e:  # already acked, or the connection went: nothing more to do
        log.warning("could not ack a dropped message: %s", _describe(e))


def _describe(error: BaseException) -> str:
    """A short, printable description: the text comes from whoever pushed the message."""
    text = f"{type(error).__name__}: {error}"[:200]
    return text.encode("unicode_escape").decode("ascii")
