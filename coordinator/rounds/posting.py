"""Posting rounds and waiting for them to end."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from celery import Celery

from coordinator.errors import BROKER_FULL, BrokerFull, QuorumError, is_broker_full
from coordinator.store import Store
from coordinator.views.documents import round_record

POLL_SECONDS = 0.1
# Redis commands (a task's LPUSH, its sent event's PUBLISH) sent in one pipeline when posting.
PUBLISH_BATCH = 1000
ProgressFn = Callable[[dict[str, Any]], None]


def parse_quorum(spec: str | int | float | None, shards: int) -> int:
    """An integer is a count of shards; a number with a decimal point a fraction of them."""
    if spec is None:
        return shards
    text = str(spec).strip()
    try:
        if "." in text:
            fraction = float(text)
            if not 0 < fraction <= 1:
                raise ValueError
            return max(1, math.ceil(fraction * shards - 1e-9))
        count = int(text)
    except ValueError:
        raise QuorumError(
            f"--quorum {text!r}: use a shard count (e.g. 6) or a fraction in (0, 1] (e.g. 0.75)"
        ) from None
    if not 1 <= count <= shards:
        raise QuorumError(f"--quorum {count}: must be between 1 and the round's {shards} shards")
    return count


def post_round(
    store: Store, app: Celery, run: str, shards: int, quorum: int, deadline: float
) -> dict[str, Any]:
    """Open a round on the current model version and enqueue one task per shard.

    If the shards cannot all be posted (Redis full, broker gone), the round is
    ended (failed) at once rather than left open with part of its shards.
    """
    with _interrupts_deferred():  # Ctrl-C must not leave a round with half its shards posted
        try:
            info = store.rounds.open(run, shards, quorum, deadline)
        except redis.ResponseError as e:
            if is_broker_full(e):
                raise BrokerFull(f"no round of {run!r} was posted: {BROKER_FULL}, then post again") from None
            raise
        try:
            config = store.run_config(run)
            twice = replicated_shards(run, int(info["round"]), shards, config.replicate)
            store.rounds.replicate(run, int(info["round"]), twice)
            store.renew_urls(run, int(info["base_version"]))
            _send_shards(store, app, config.need.queue, run, info, shards, set(twice))
        except Exception as e:
            reason = f"could not post its shards: {type(e).__name__}: {e}"[:200]
            store.rounds.abort(run, int(info["round"]), reason)
            if is_broker_full(e):
                raise BrokerFull(f"no round of {run!r} was posted: {BROKER_FULL}, then post again") from None
            raise
    return info


def shard_task(run: str, number: int, shard: int, shards: int, version: int) -> dict[str, Any]:
    """The keyword arguments of one ``train_shard`` task.

    Nothing secret rides in it (every volunteer may read the queue and kombu's
    ``unacked``): a run's upload slot comes with the shard's lease, which only
    the volunteer granted it reads (``coordinator.rounds.leases``).
    """
    return {"run": run, "round": number, "shard": shard, "shards": shards, "version": version}


def replicated_shards(run: str, number: int, shards: int, fraction: float) -> list[int]:
    """The shards of a round posted twice (``init --replicate F``): a fixed draw per round."""
    count = min(shards, math.ceil(fraction * shards - 1e-9)) if fraction > 0 else 0
    return sorted(random.Random(f"{run}|{number}").sample(range(shards), count))


def send_shards(app: Celery, queue: str, tasks: Iterable[dict[str, Any]]) -> None:
    """Post ``train_shard`` tasks in pipelined batches: one Redis round trip per PUBLISH_BATCH messages.

    Each task's message and its task-sent event are the ones ``send_task``
    makes; kombu's publish batch only defers the Redis commands. A failed
    batch raises, and the caller ends the round rather than leave it half posted.
    """
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for task in tasks:
            app.send_task("train_shard", queue=queue, producer=producer, ignore_result=True, kwargs=task)


def _send_shards(
    store: Store, app: Celery, queue: str, run: str, info: dict[str, Any], shards: int, twice: set[int]
) -> None:
    number, base = int(info["round"]), int(info["base_version"])
    # a replicated shard is posted twice in a row, so two volunteers take it at about once
    tasks = (
        shard_task(run, number, shard, shards, base)
        for shard in range(shards)
        for _ in range(2 if shard in twice else 1)
    )
    send_shards(app, queue, tasks)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block is done, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def wait_round(
    store: Store, run: str, number: int, progress: ProgressFn | None = None, poll: float = POLL_SECONDS
) -> dict[str, Any]:
    """Block until the round is done or failed; report its live counters meanwhile.

    A broker that goes away (a Redis restart) is waited out by the store's
    client (redis-py ``Retry``): the round itself lives in Redis.
    """
    while True:
        info = store.rounds.info(run, number)
        if info is None:
            raise LookupError(f"round {number} of run {run!r} does not exist")
        if progress is not None:
            progress(info)
        if info["status"] in ("done", "failed"):
            return round_record(store, run, number)
        time.sleep(poll)
