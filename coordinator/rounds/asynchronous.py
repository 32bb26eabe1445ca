"""Asynchronous runs (``init --mode async --buffer K --max-staleness S``): no round barrier.

A volunteer 100x slower than another must not hold it up. In an asynchronous
run each round is a *buffer* (FedBuff, Nguyen et al. 2022): it opens on the
current version, takes the next K accepted deltas *whatever version they were
trained on*, and its merge publishes the next version; then the next buffer
opens. The coordinator's ``run`` keeps ``--shards N`` shard jobs outstanding,
each posted on the version current when it is posted, and returns after R new
versions.

A delta trained on version v and counted in a buffer opened on version c is
``c - v`` versions stale: more than S and it is rejected (``stale``); else it
weighs ``samples / sqrt(1 + staleness)`` in the merge, so an old direction
counts less. A buffer is merged as one outer step, and a momentum strategy
(``diloco``, ``fedavgm``) moves its momentum only once every
``ceil(shards / buffer)`` buffers, by their average (delayed Nesterov,
``strategies.OuterSGD``): a stale delta is not amplified by the momentum of
every version after it.

Exactly once still holds: a buffer is a round, claimed and committed by the
same scripts (one version per buffer), and an accepted copy enters the run's
taken set in ``accept.lua``, so a redelivered validation never counts it in a
second buffer. Jobs are numbered within the round they were posted with; a
buffer's accepted hash names each by its slot ``round * SLOT_STRIDE + job``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from broker.run_config import RunConfig
from coordinator.errors import RoundOpen
from coordinator.rounds.posting import send_shards, shard_task
from coordinator.store import Store

log = logging.getLogger("crowdtrain.asynchronous")

# Jobs one round may post; slots of different posting rounds never meet.
SLOT_STRIDE = 1 << 20
POLL_SECONDS = 0.1


def slot(posted_round: int, job: int) -> int:
    """Where a job's delta sits in a buffer's accepted hash: unique across posting rounds."""
    return posted_round * SLOT_STRIDE + job


def staleness_weight(staleness: int) -> float:
    """FedBuff's discount of a delta ``staleness`` versions old: 1 / sqrt(1 + staleness)."""
    return 1.0 / math.sqrt(1 + max(0, staleness))


def open_buffer(store: Store, run: str, config: RunConfig) -> dict[str, Any] | None:
    """Open the run's next buffer on the current version; None if one is open already."""
    try:
        return store.rounds.open(run, 0, config.buffer_size, config.deadline)
    except RoundOpen:
        return None


def post_jobs(
    store: Store, app: Celery, run: str, config: RunConfig, info: dict[str, Any], count: int
) -> None:
    """Post ``count`` shard jobs on the buffer ``info``'s version, numbered on from its last job."""
    number, base, shards = int(info["round"]), int(info["base_version"]), config.shards
    total = store.rounds.add_jobs(run, number, count)
    queue = config.need.queue
    store.renew_urls(run, base, config.staleness_limit + 1)
    tasks = (shard_task(run, number, job, shards, base) for job in range(total - count, total))
    send_shards(app, queue, tasks)


def drive(
    store: Store,
    app: Celery,
    run: str,
    versions: int,
    progress: Callable[[dict[str, Any]], None] | None = None,
    poll: float = POLL_SECONDS,
) -> list[int]:
    """Keep ``shards`` jobs outstanding until ``versions`` more versions are out; the buffers that made them.

    Opens a buffer whenever none is open (the aggregator opens the next one
    itself after a merge; this covers the first and an aggregator that died
    between its commit and that).
    """
    config = store.run_config(run)
    first_round = store.rounds.count(run) + 1
    target = store.version(run) + versions
    while store.version(run) < target:
        current = store.rounds.current(run)
        if current is None or current["status"] in ("done", "failed"):
            current = open_buffer(store, run, config) or store.rounds.current(run)
        if current is not None and current["status"] == "open":
            missing = config.shards - store.rounds.outstanding(run)
            if missing > 0:
                post_jobs(store, app, run, config, current, missing)
            if progress is not None:
                progress(current)
        time.sleep(poll)
    made = []
    for number in range(first_round, store.rounds.count(run) + 1):
        info = store.rounds.info(run, number) or {}
        # the R versions asked for (a buffer may have been merged since the loop looked)
        if info.get("status") == "done" and int(info["base_version"]) < target:
            made.append(number)
    return made
