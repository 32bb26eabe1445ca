"""Keeping Redis bounded against volunteers who upload and never announce it.

A volunteer may write any key under its own upload prefix, with any TTL or
none, without ever sending ``validate_delta``. The aggregator's watcher thread
sweeps those prefixes now and then: every upload gets a TTL, an upload larger
than its run's bound (or for no known run) is deleted, and a volunteer keeps
at most ``MAX_OUTSTANDING_UPLOADS`` waiting (the oldest go first). It also
reloads the Lua scripts kombu runs, which least-privilege volunteers may only
EVALSHA and which a Redis restart forgets.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import redis

from broker import keys
from broker.errors import UnknownRun
from coordinator.context import RunContexts
from coordinator.credentials import preload_scripts
from coordinator.store import Store

log = logging.getLogger("crowdtrain.janitor")
SCAN_BATCH = 1000


def sweep_uploads(store: Store, contexts: RunContexts) -> int:
    """One sweep over every volunteer's uploads; returns how many were deleted."""
    pattern = keys.upload_pattern("*")
    found = [key.decode() for key in store.redis.scan_iter(match=pattern, count=SCAN_BATCH)]
    if not found:
        return 0
    pipe = store.redis.pipeline(transaction=False)
    for key in found:
        pipe.strlen(key)
        pipe.ttl(key)
    replies = pipe.execute()
    doomed: list[str] = []
    waiting: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key, size, ttl in zip(found, replies[0::2], replies[1::2]):
        if int(size) > _bound(contexts, key):
            doomed.append(key)
            continue
        if int(ttl) == -1:
            store.redis.expire(key, keys.UPLOAD_TTL)
            ttl = keys.UPLOAD_TTL
        waiting[keys.volunteer_of(key)].append((int(ttl), key))
    for uploads in waiting.values():
        uploads.sort(reverse=True)  # longest time left first: the newest
        doomed.extend(key for _, key in uploads[keys.MAX_OUTSTANDING_UPLOADS :])
    if doomed:
        store.delete_upload(*doomed)
        log.warning(
            "deleted %d uploads that were too large, for no run, or over a volunteer's cap", len(doomed)
        )
    return len(doomed)


def housekeeping(store: Store, contexts: RunContexts) -> None:
    """What the watcher runs every sweep period; a failure is logged, never fatal."""
    try:
        sweep_uploads(store, contexts)
        preload_scripts(store.redis)
    except redis.RedisError as e:
        log.warning("housekeeping: %s (retrying)", e)


def _bound(contexts: RunContexts, key: str) -> int:
    """The upload bound of the run named in ``key``, 0 (delete it) when that run is unknown."""
    parts = key.split(":")
    if len(parts) != 7:
        return 0  # not a key volunteer.store writes
    run = parts[3]
    try:
        return contexts[run].upload_bound
    except (UnknownRun, LookupError):
        return 0
