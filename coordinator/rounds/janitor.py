"""The aggregator's watcher: deadlines, lost messages, and a bounded Redis.

It runs in a thread beside the aggregator's worker and covers what no task
message triggers:

- rounds due by their deadline, or whose aggregator died holding them or
  before it sent ``aggregate_round`` (a round due by its count is left to the
  one that counted it for ``COUNTED_GRACE`` seconds, so it is posted once);
- uploads whose announcement was lost (``coordinator.rounds.announcements``): an
  aggregator that died holding a batch it had taken off the list, a list that
  overflowed its cap, a volunteer that never announced. An upload of an open
  round still waiting after a whole sweep period is announced again;
- uploads never announced: a volunteer may write any key under its own
  upload prefix, with any TTL or none. Every upload gets a TTL, one larger
  than its run's bound (or for no known run) is deleted, and a volunteer keeps
  at most ``MAX_OUTSTANDING_UPLOADS`` waiting (the oldest go first).

It also reloads the Lua scripts kombu runs, which least-privilege volunteers
may only EVALSHA and which a Redis restart forgets; sweeps kombu's keys that
volunteers may write (``coordinator.rounds.bookkeeping``); and watches Redis's memory:
a Redis near ``maxmemory`` is reported and swept at once, not a period later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis

from broker import blobs, keys
from broker.errors import UnknownRun
from broker.throttle import flush_all, throttle
from coordinator.rounds import bookkeeping
from coordinator.runs.context import RunContexts
from coordinator.runs.credentials import preload_scripts
from coordinator.store import Store

log = logging.getLogger("crowdtrain.janitor")
throttle(log.name)  # a line per junk upload would be a volunteer's to multiply
SCAN_BATCH = 1000
DEADLINE_POLL = 0.5
DEADLINE_RESEND = 10.0
# A round due by its count was posted by whoever counted its last upload
# (coordinator.rounds.announcements); the watcher posts it only if it is still
# waiting this long after, for an aggregator that died before posting it.
COUNTED_GRACE = 5.0
MEMORY_POLL = 5.0  # seconds between looks at Redis's memory
FULL = 0.9  # of maxmemory: Redis is reported full, and swept at once

# send(task name, args): how the watcher posts ``aggregate_round``
Send = Callable[[str, list], None]


def watch(
    store: Store,
    send: Send,
    stop: threading.Event,
    sweep_period: float,
    contexts: RunContexts | None = None,
) -> None:
    """Post what is due until ``stop`` is set; sweep uploads every ``sweep_period`` seconds.

    ``contexts``: the aggregator's own, so a run's context is built once per process.
    """
    sent: dict[tuple[str, int], float] = {}
    counted: dict[tuple[str, int], float] = {}  # when each round was first seen due by its count
    contexts = contexts if contexts is not None else RunContexts(store)
    waiting: set[str] = set()
    swept = looked = 0.0
    while not stop.is_set():
        try:
            now = time.time()
            if now - looked >= MEMORY_POLL:
                looked = now
                if full(store.redis) and now - swept >= MEMORY_POLL:
                    swept = 0.0  # sweep now: the junk may be what fills it
            if now - swept >= sweep_period:
                swept = now
                waiting = housekeeping(store, contexts, send, waiting, horizon=10 * sweep_period)
            due = store.rounds.due(now)
            counted = {key: counted.get(key, now) for key, why in due.items() if why == "count"}
            for key, why in due.items():
                if why == "count" and now - counted[key] < COUNTED_GRACE:
                    continue
                if now - sent.get(key, 0.0) >= DEADLINE_RESEND:
                    sent[key] = now
                    send("aggregate_round", list(key))
        except Exception as e:  # a broker outage, or a full Redis, must not kill the watcher
            log.warning("watcher: %s (retrying)", e)
        flush_all()  # the counts of rate-limited warnings whose period is over
        stop.wait(DEADLINE_POLL)


def full(client: redis.Redis) -> bool:
    """True (and a log line) when Redis uses ``FULL`` of its ``maxmemory`` or more."""
    memory = client.info("memory")
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    if not limit or used < FULL * limit:
        return False
    log.warning(
        "Redis is out of memory: %.0f of maxmemory %.0f MiB used; sweeping, writes wait until it frees",
        used / 2**20,
        limit / 2**20,
    )
    return True


def sweep_uploads(
    store: Store, contexts: RunContexts, seen: set[str] | frozenset[str] = frozenset()
) -> set[str]:
    """One sweep over every volunteer's uploads; returns the keys left waiting.

    An upload for no known run goes at once. One larger than its run's bound
    goes once it was ``seen`` by the sweep before: its announcement, if any,
    has had a whole sweep to be validated, so the volunteer hears why.
    """
    pattern = keys.upload_pattern("*")
    found = [key.decode() for key in store.redis.scan_iter(match=pattern, count=SCAN_BATCH)]
    if not found:
        return set()
    pipe = store.redis.pipeline(transaction=False)
    for key in found:
        blobs.stored_bytes(pipe, key)
        pipe.ttl(key)
    replies = pipe.execute()
    doomed: list[str] = []
    waiting: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key, size, ttl in zip(found, replies[0::2], replies[1::2]):
        if size is None:  # gone since the scan
            continue
        bound = _bound(contexts, key)
        if bound == 0 or (int(size) > blobs.storage_bound(bound) and key in seen):
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
    return set(found) - set(doomed)


def housekeeping(
    store: Store,
    contexts: RunContexts,
    send: Send,
    waiting_before: set[str],
    horizon: float = bookkeeping.MIN_HORIZON,
) -> set[str]:
    """One sweep period's work; returns the uploads now waiting. A failure is logged, never fatal.

    ``horizon``: seconds an unacked kombu entry may go unrefreshed (``coordinator.rounds.bookkeeping``).
    """
    try:
        bookkeeping.sweep(store.redis, horizon)  # first: it frees what a volunteer filled Redis with
        waiting = sweep_uploads(store, contexts, waiting_before)
        revalidate(store, waiting & waiting_before)
        preload_scripts(store.redis)
    except redis.RedisError as e:
        log.warning("housekeeping: %s (retrying)", e)
        return waiting_before
    return waiting


def revalidate(store: Store, stuck: set[str]) -> None:
    """Announce again the uploads of open rounds that waited a whole sweep period.

    Validating twice is harmless (the upload is moved before it is read, and a
    shard is counted once), so an announcement that was only slow costs one lookup.
    """
    again = []
    for key in sorted(stuck):
        parsed = keys.checked_upload(key)
        if parsed is None:
            continue
        _, run, number, _, _ = parsed
        info = store.rounds.info(run, number)
        if info is not None and _buffered(store, run):  # counted in the buffer open now, if any
            info = store.rounds.current(run)
        if info is None or info.get("status") != "open":
            continue
        log.warning("upload %s waited a whole sweep unvalidated: announcing it again", key)
        again.append(key)
    store.announce(*again)


def _buffered(store: Store, run: str) -> bool:
    """True for an asynchronous run, whose uploads count in whichever buffer is open."""
    try:
        return store.run_config(run).is_async
    except UnknownRun:
        return False


def _bound(contexts: RunContexts, key: str) -> int:
    """The upload bound of the run named in ``key``, 0 (delete it) when that run is unknown.

    An upload still being written (``keys.partial``) is held to its upload's bound.
    """
    parsed = keys.parse_upload(keys.whole(key))
    if parsed is None:
        return 0  # not a key volunteer.store writes
    run = parsed[1]
    try:
        return contexts[run].upload_bound
    except (UnknownRun, LookupError):
        return 0
