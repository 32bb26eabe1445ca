"""kombu's keys that volunteers may write, kept bounded by the trusted side.

To pull ``train`` tasks with acks_late, a volunteer's ACL user must write
kombu's bookkeeping: the queues (``train``, ``train.*`` and their priority
lists), the ``unacked`` hash and its ``unacked_index``, the mutex, and the
``_kombu.binding.*`` sets. The ACL cannot say *what* goes there, so one
volunteer could fill Redis through them (to ``maxmemory``, and then every
write of everyone's fails). The watcher (``coordinator.rounds.janitor``) sweeps them
once a period with ``sweep``:

- ``unacked``/``unacked_index``: a field without an index entry, an index entry
  without a field, a tag or an entry too long to be kombu's, and an entry whose
  time is in the future or older than ``horizon`` (living workers refresh theirs
  every few seconds, ``tasks.visibility``; dead workers' are restored after a
  visibility timeout) go (``lua/sweep_unacked.lua``); while the rest holds more
  than ``MAX_UNACKED_BYTES``, the largest entries go (a shard whose entry goes
  loses only its redelivery, should its worker die);
- a ``train.*`` or ``train`` priority list that is no queue a run may post to
  (``broker.routing.train_queues``) goes, and so does a key of the wrong type where
  kombu expects a list, hash, sorted set or set; in the real queues, entries longer
  than ``MAX_MESSAGE_BYTES`` go (``lua/sweep_list.lua``);
- a binding set of an exchange crowdtrain does not use goes; in the others,
  members too long to be a binding go, and a set grown past ``MAX_BINDINGS``
  is emptied (living workers bind again). Routing to our queues never reads these
  sets (``tasks.poison``).

The trusted side keeps its own unacked bookkeeping under ``ct:trusted:*``,
which no volunteer reaches. What the sweep cannot bound: more than
``MAX_UNACKED_BYTES`` of entries of at most ``MIN_EVICTED_BYTES`` each, which a
volunteer keeps refreshing, and small junk messages on a real queue (the
volunteers that take them drop them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from broker import keys
from broker.routing import train_queues
from coordinator.rounds.state import lua_source

log = logging.getLogger("crowdtrain.janitor")

PRIORITY_SEP = "\x06\x16"  # kombu: QUEUE + this + priority step names a priority list
PRIORITY_STEPS = (3, 6, 9)  # kombu's steps above 0 (priority 0 uses the queue's own list)
BINDING_PREFIX = "_kombu.binding."
BINDING_DEADLINES = "_kombu.binding_deadlines"
BINDING_PERMANENT_PREFIX = "_kombu.binding_permanent."
# Exchanges crowdtrain's workers bind: the queues' own, Celery's control (pidbox), its replies, events.
OTHER_EXCHANGES = ("celery.pidbox", "reply.celery.pidbox", "celeryev")
MAX_TAG = 128  # kombu's delivery tags are uuid4 strings (36 characters)
MAX_MEMBER = 1024  # routing key, pattern and queue name, joined
MAX_BINDINGS = 10_000  # members of one binding set: one per worker or listener
MIN_HORIZON = 3600.0  # seconds an unacked entry may go unrefreshed and unrestored
# Bytes the volunteers' unacked entries may hold in all: some 20,000 held shard messages of a few
# KiB. Past it the largest entries go (halving the bound, down to MIN_EVICTED_BYTES).
MAX_UNACKED_BYTES = 64 * 2**20
MIN_EVICTED_BYTES = 4096
STEP = 100  # entries a sweep step looks at
SCAN_COUNT = 10_000  # keys a SCAN call looks at: few round trips over a large keyspace


@dataclass
class Swept:
    """What one sweep deleted."""

    unacked: int = 0
    keys: int = 0
    entries: int = 0
    members: int = 0

    def __bool__(self) -> bool:
        return bool(self.unacked or self.keys or self.entries or self.members)


def sweep(client: redis.Redis, horizon: float = MIN_HORIZON, now: float | None = None) -> Swept:
    """Sweep every kombu key family a volunteer may write; returns what went (see the module)."""
    now = time.time() if now is None else now
    swept = Swept()
    swept.unacked = _sweep_unacked(client, now - max(horizon, MIN_HORIZON), now + 60.0)
    queues = train_queues()
    lists = queues | {f"{q}{PRIORITY_SEP}{step}" for q in queues for step in PRIORITY_STEPS}
    volunteer_lists = (f"{keys.TRAIN_QUEUE}.", f"{keys.TRAIN_QUEUE}{PRIORITY_SEP}")
    for found in _scan(client, f"{keys.TRAIN_QUEUE}*"):  # one pass for both patterns
        if _text(found).startswith(volunteer_lists) and _text(found) not in lists:
            swept.keys += int(client.delete(found))
    for name in [*sorted(lists), keys.UNACKED_MUTEX]:
        kind = client.type(name).decode()
        if kind == "none":
            continue
        if kind != ("string" if name == keys.UNACKED_MUTEX else "list"):
            swept.keys += int(client.delete(name))
        elif kind == "list":
            swept.entries += _sweep_list(client, name)
    exchanges = queues | {keys.AGGREGATE_QUEUE, *OTHER_EXCHANGES}
    for key in _scan(client, "_kombu.binding*"):  # one pass for both prefixes (and the deadlines)
        name = _text(key)
        prefix = next((p for p in (BINDING_PREFIX, BINDING_PERMANENT_PREFIX) if name.startswith(p)), None)
        if prefix is None:
            continue
        if name[len(prefix) :] not in exchanges or client.type(key) != b"set":
            swept.keys += int(client.delete(key))
        else:
            swept.members += _sweep_set(client, key)
    swept.members += _sweep_deadlines(client, exchanges)
    if swept:
        log.warning(
            "swept kombu keys a volunteer may write: %d unacked entries, %d keys, %d queue entries, "
            "%d binding members",
            swept.unacked,
            swept.keys,
            swept.entries,
            swept.members,
        )
    return swept


def _sweep_unacked(client: redis.Redis, oldest: float, newest: float) -> int:
    """Entries deleted: the junk, then, while the rest holds over ``MAX_UNACKED_BYTES``, the largest."""
    for key, kind in ((keys.UNACKED, b"hash"), (keys.UNACKED_INDEX, b"zset")):
        if client.type(key) not in (kind, b"none"):
            client.delete(key)
    longest = keys.MAX_MESSAGE_BYTES
    deleted, kept = _unacked_pass(client, oldest, newest, longest)
    while kept > MAX_UNACKED_BYTES and longest > MIN_EVICTED_BYTES:
        longest //= 2  # honest entries are a few KiB: the largest go first
        log.warning(
            "unacked holds %d bytes, over %d: deleting entries over %d bytes",
            kept,
            MAX_UNACKED_BYTES,
            longest,
        )
        gone, kept = _unacked_pass(client, oldest, newest, longest)
        deleted += gone
    return deleted


def _unacked_pass(client: redis.Redis, oldest: float, newest: float, longest: int) -> tuple[int, int]:
    """One pass of ``lua/sweep_unacked.lua`` over the hash and its index: (entries deleted, bytes kept)."""
    script = client.register_script(lua_source("sweep_unacked"))
    cursors: list[str | bytes] = ["0", "0"]
    deleted = kept = 0
    while True:
        args = [*cursors, STEP, MAX_TAG, longest, oldest, newest]
        hash_cursor, index_cursor, gone, size = script(keys=[keys.UNACKED, keys.UNACKED_INDEX], args=args)
        cursors, deleted, kept = [hash_cursor, index_cursor], deleted + int(gone), kept + int(size)
        if cursors == [b"done", b"done"]:
            return deleted, kept


def _sweep_list(client: redis.Redis, key: str | bytes) -> int:
    script = client.register_script(lua_source("sweep_list"))
    first, removed = 0, 0
    while True:
        seen, gone = script(keys=[key], args=[first, STEP, keys.MAX_MESSAGE_BYTES])
        removed += int(gone)
        first += int(seen) - int(gone)
        if int(seen) < STEP:
            return removed


def _sweep_set(client: redis.Redis, key: bytes) -> int:
    if int(client.scard(key)) > MAX_BINDINGS:
        count = int(client.scard(key))
        client.delete(key)
        return count
    long = [m for m in client.sscan_iter(key, count=STEP) if len(m) > MAX_MEMBER]
    return int(client.srem(key, *long)) if long else 0


def _sweep_deadlines(client: redis.Redis, exchanges: frozenset[str] | set[str]) -> int:
    kind = client.type(BINDING_DEADLINES)
    if kind == b"none":
        return 0
    if kind != b"zset":
        client.delete(BINDING_DEADLINES)
        return 1
    members = client.zscan_iter(BINDING_DEADLINES, count=STEP)
    wrong = [m for m, _ in members if _text(m) not in exchanges]
    return int(client.zrem(BINDING_DEADLINES, *wrong)) if wrong else 0


def _scan(client: redis.Redis, pattern: str) -> Iterator[bytes]:
    """The keys matching the pattern, as the bytes they are (a volunteer names them)."""
    yield from client.scan_iter(match=pattern, count=SCAN_COUNT)


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")
