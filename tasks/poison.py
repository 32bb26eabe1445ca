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

A worker runs only its app's own tasks (``CrowdtrainApp.own_tasks``: a
volunteer ``train_shard``, the aggregator ``aggregate_round`` and ``merge_slices``). A message naming
any other task, Celery's built-ins (``celery.map``, ``celery.chunks``, ...)
included, is acked and dropped by ``DropMalformed`` before Celery looks it up:
out of the box Celery would store a ``NotRegistered`` failure, which a
volunteer's ACL refuses, and the worker would exit on the refusal.

The same transport also keeps a volunteer alive when one of kombu's Lua scripts
is refused by its least-privilege ACL (after a Redis restart the scripts it may
run with EVALSHA are gone until the aggregator loads them again): the restore
of other workers' unacked messages and the periodic binding refresh are
skipped, and a queue binding at start-up is made without the script. Everything
a volunteer may write is untrusted here too: an unacked entry is restored only
if it is a message of bounded size for a ``train`` queue (else it is deleted),
our queues' routing never reads the (volunteer-writable) binding sets, and a
write Redis refuses for memory while a message is taken is logged, not fatal.
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
from kombu.transport import virtual
from kombu.transport.virtual import Empty
from kombu.utils.json import loads as json_loads

from broker.keys import AGGREGATE_QUEUE, MAX_MESSAGE_BYTES, TRUSTED_UNACKED
from broker.routing import train_queues
from broker.sentinel import FollowPrimaryConnection
from broker.throttle import throttle

log = logging.getLogger("crowdtrain.poison")
# Junk comes as fast as Redis takes it: a few warnings and a count per period, not a line each;
# so do the failures Celery and kombu log per forged message (a task's bad arguments, with traceback).
throttle(log.name, "celery.app.trace", "celery.worker.consumer.consumer", "kombu.transport.redis")

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
# Queues whose exchange (named after the queue) routes to that queue alone.
OUR_QUEUES = train_queues() | {AGGREGATE_QUEUE}


class GuardedQoS(kombu_redis.QoS):
    """kombu's QoS: restores only well-formed train messages, survives a refused script or a full Redis."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Remember a delivered message for redelivery; if Redis refuses (full), deliver it anyway."""
        try:
            super().append(message, delivery_tag)
        except redis.exceptions.ResponseError as e:  # OOM or NOPERM: the message is taken already
            log.warning("Redis refused to note a message as unacked (%s): it is not redelivered if lost", e)
            virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except redis.exceptions.ResponseError as e:  # the entry stays; a sweep or restore deals with it
            log.warning("Redis refused to forget an acked message (%s)", e)
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue)
        except redis.exceptions.ResponseError as e:
            log.warning("Redis refused to forget a rejected message (%s)", e)
            virtual.QoS.ack(self, delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        """kombu's removal of an entry, outside a transaction when on its own: a full Redis refuses
        every command queued in MULTI, deletions included, and would refuse every ack."""
        if pipe is not None:
            return super()._remove_from_indices(delivery_tag, pipe)
        with self.channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
        return pipe.zrem(self.unacked_index_key, delivery_tag).hdel(self.unacked_key, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        try:
            super().restore_visible(start, num, interval)
        except redis.exceptions.NoPermissionError as e:
            log.warning("skipped restoring unacked messages (not permitted: %s); retried later", e)
        except redis.exceptions.ResponseError as e:  # a full Redis: the messages stay where they are
            log.warning("skipped restoring unacked messages (%s); retried later", e)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu's restore of one unacked message, which a volunteer may have written: a message
        too long, not a message, or for no train queue is deleted, never pushed anywhere."""

        def restore_transaction(pipe: Any) -> None:
            size = pipe.hstrlen(self.unacked_key, tag)
            raw = pipe.hget(self.unacked_key, tag) if 0 < size <= MAX_MESSAGE_BYTES else None
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if not size:
                return
            # the trusted side's own entries (under ct:trusted:*) may go back to `aggregate`
            target = restorable(raw, OUR_QUEUES if self.unacked_key == TRUSTED_UNACKED else train_queues())
            if target is None:
                log.warning("deleted an unacked entry, no message for a queue of ours (%d bytes)", size)
                return
            payload, queue = target
            self.channel._do_restore_message(payload, "", queue, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)


def restorable(raw: bytes | None, queues: frozenset[str]) -> tuple[dict, str] | None:
    """(message, queue) of an unacked entry ``[message, exchange, routing key]`` for one of ``queues``;
    None for anything else."""
    if raw is None:
        return None
    try:
        entry = json_loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except MALFORMED:
        return None
    if not (isinstance(entry, list) and len(entry) == 3):
        return None
    payload, exchange, routing_key = entry
    queue = exchange or routing_key  # crowdtrain's exchanges are named after their one queue
    if not (isinstance(payload, dict) and isinstance(queue, str) and queue in queues):
        return None
    properties = payload.get("properties")
    if not (
        isinstance(payload.get("headers"), dict)
        and isinstance(properties, dict)
        and isinstance(properties.get("delivery_info"), dict)
    ):
        return None
    if exchange and routing_key != exchange:
        return None
    return payload, queue


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel that drops envelopes it cannot decode."""

    QoS = GuardedQoS

    def _lookup(self, exchange: Any, routing_key: Any, default: Any = None) -> Any:
        """Our queues' exchanges route to the queue of their name, whatever the binding sets hold:
        a volunteer may add members to those sets, which would copy the trusted side's messages
        to queues (or keys) of its choosing."""
        if exchange in OUR_QUEUES:
            return [exchange]
        return super()._lookup(exchange, routing_key, default)

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
        except redis.exceptions.ResponseError as e:  # a full Redis: our queues route without bindings
            log.warning("could not bind %s (%s); consuming anyway, bound again on the next start", queue, e)

    def maybe_refresh_binding_expiry(self) -> None:
        """kombu's periodic binding refresh and sweep: skipped (not fatal) while its scripts are refused."""
        try:
            super().maybe_refresh_binding_expiry()
        except SCRIPT_REFUSED as e:
            log.warning("skipped refreshing queue bindings (%s); the aggregator reloads the scripts", e)


class GuardedTransport(kombu_redis.Transport):
    """The Redis transport with ``GuardedChannel``."""

    Channel = GuardedChannel


class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """``GuardedChannel`` on kombu's Sentinel channel: it asks the sentinels for the primary, on every
    reconnect (``FollowPrimaryConnection``)."""

    connection_class = FollowPrimaryConnection


class GuardedSentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://`` brokers) with ``GuardedSentinelChannel``."""

    Channel = GuardedSentinelChannel


class DropMalformed(bootsteps.StartStopStep):
    """Consumer step: only the app's own tasks have a strategy, each wrapped so a malformed message
    is dropped, not fatal; a message naming any other task is dropped before Celery handles it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "crowdtrain drop-malformed"

    def start(self, c: Any) -> None:
        # Tasks.start rebuilt the strategies (also after a reconnect); the task handler, made
        # after this step, looks them up per message, so changing them in place is enough.
        own = getattr(c.app, "own_tasks", None)
        for name, strategy in list(c.strategies.items()):
            if own is not None and name not in own:
                del c.strategies[name]  # Celery's built-ins: celery.map, celery.chunks, ...
            elif not getattr(strategy, "crowdtrain_guarded", False):
                c.strategies[name] = guarded(name, strategy)
        # Celery's own handler of an unknown task stores a failure result (refused to a
        # volunteer, which then exits) and logs a traceback per message.
        c.on_unknown_task = drop_unknown


def drop_unknown(body: Any, message: Any, exc: BaseException) -> None:
    """Ack and drop a message naming a task this worker does not run, with a (rate-limited) line."""
    headers = getattr(message, "headers", None)
    name = headers.get("task") if isinstance(headers, dict) else None
    text = repr(name)[:80].encode("unicode_escape").decode("ascii")
    log.warning("dropped a message naming task %s: not a task this worker runs", text)
    _drop(message)


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
