"""Announced uploads: strict parsing, a bounded list, and a batch validated in one go (real Redis)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import torch

from broker import keys
from coordinator.merging.aggregator import Aggregator
from coordinator.rounds.announcements import (
    BATCH,
    IDLE_AFTER,
    IDLE_MAX,
    MAX_ENTRY,
    POLL_MAX,
    POLL_MIN,
    Inbox,
    parse,
    serve,
)
from coordinator.rounds.intake import Upload
from coordinator.rounds.leases import Request
from coordinator.store import Store
from serialization import loads
from tests.fixtures.attacker import delta_blob
from volunteer.store import VolunteerStore

TINY = "tests.fixtures.jobs_tiny:make_job"
TOKEN = "0123abcd" * 4


def test_parse_takes_well_formed_upload_keys_once_and_sets_every_other_entry_aside():
    good = keys.upload("bob", "r", 3, 1, TOKEN).encode()
    bad = [
        b"\xff\xfe not ascii",
        b"",
        b"ct:upload:bob:r:3:1",  # no token
        keys.upload("bob", "r", 3, 1, "NOT-HEX-TOKEN").encode(),
        keys.upload("bob\n", "r", 3, 1, TOKEN).encode(),  # a name with a newline
        keys.upload("bob", "r", 3, 1, TOKEN + "\n").encode(),
        "ct:upload:bob:r:²:1:0123abcd".encode(),  # a digit int() refuses
        keys.upload("bob", "r", 1 << 40, 1, TOKEN).encode(),  # beyond any round number
        keys.upload("bob", "r:x", 3, 1, TOKEN).encode(),
        keys.accepted_upload("r", 3, "bob", 1, TOKEN).encode(),  # a trusted key, not an upload
    ]

    uploads, malformed = parse([good, *bad, good])

    assert uploads == [Upload("r", 3, 1, "bob", TOKEN)]
    assert malformed == bad


def test_drain_drops_entries_too_long_unread_and_the_newest_beyond_the_cap(redis_server):
    store = Store(redis_server.client())
    entries = [f"entry-{i}".encode() for i in range(6)]
    store.redis.rpush(keys.announcements(), entries[0], b"x" * (MAX_ENTRY + 1), *entries[1:])

    dropped, taken = store.take_announcements(count=3, longest=MAX_ENTRY, cap=5)
    assert (dropped, taken) == (3, [entries[0], entries[1]])  # the long one, and two over the cap
    dropped, taken = store.take_announcements(count=3, longest=MAX_ENTRY, cap=5)
    assert (dropped, taken) == (0, [entries[2], entries[3]])
    assert store.take_announcements(count=3, longest=MAX_ENTRY, cap=5) == (0, [])


def test_an_inbox_counts_a_batch_once_and_asks_for_the_round_once(processes, redis_server):
    # arrange: a round of 3 shards; each upload announced as a volunteer does, one announced thrice
    processes.json("init", "--run", "r", "--job", TINY, "--compression", "none")  # float32 uploads below
    store = Store(redis_server.client())
    number = store.rounds.open("r", 3, 3, 600.0)["round"]
    weights, _ = loads(store.model_blob("r", 0))
    aggregator = Aggregator(store, processes.home)
    for shard, name in enumerate(("ann", "ben", "cid")):
        delta = {k: torch.full_like(v, 0.01 * (shard + 1)) for k, v in weights.items()}
        token = uuid.uuid4().hex  # each under the lease the trusted side gave it
        assert aggregator.leases.answer([Request(name, "lease", "r", number, shard, token)]) == ["granted"]
        key = VolunteerStore(store.redis, name).put_upload(
            "r", number, shard, token, delta_blob(delta, "r", number, shard, 0)
        )
    store.announce(key, key)  # cid's again, twice
    posted: list[tuple[str, dict[str, Any], str]] = []
    inbox = Inbox(store, aggregator.intake, lambda *p: posted.append(p))

    # act
    taken = inbox.drain()

    # assert
    assert taken == 5 and store.redis.llen(keys.announcements()) == 0
    info = store.rounds.info("r", number) or {}
    assert (info["accepted"], info["rejected"]) == (3, 0)
    assert posted == [("aggregate_round", {"run": "r", "round": number}, keys.AGGREGATE_QUEUE)]
    assert sorted(store.rounds.accepted_uploads("r", number)) == [0, 1, 2]
    assert not list(store.redis.scan_iter(match=keys.upload_pattern("*")))  # moved out of reach
    # announced once more later: a repeat, not a second vote
    store.announce(key)
    inbox.drain()
    assert (store.rounds.info("r", number) or {})["accepted"] == 3


class _Clock(threading.Event):
    """A stop event whose ``wait`` only records the pause and moves a simulated clock on."""

    def __init__(self, until: float) -> None:
        super().__init__()
        self.now, self.until, self.waits = 0.0, until, []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        self.now += timeout
        if self.now >= self.until:
            self.set()
        return self.is_set()


class _Inbox:
    """At the first drain from each ``script`` time on (simulated s), takes what its list says, a drain
    each; nothing otherwise."""

    def __init__(self, clock: _Clock, script: dict[float, list[int]]) -> None:
        self.clock, self.drains = clock, 0
        self.script, self.taking = dict(script), []

    def drain(self) -> int:
        self.drains += 1
        due = [at for at in self.script if at <= self.clock.now]
        if due and not self.taking:
            self.taking = self.script.pop(min(due))
        return self.taking.pop(0) if self.taking else 0


def _serve(until: float, script: dict[float, list[int]]) -> tuple[_Clock, _Inbox]:
    clock = _Clock(until)
    inbox = _Inbox(clock, script)
    serve(inbox, clock)  # type: ignore[arg-type]  # the loop is what is tested, not the Inbox
    return clock, inbox


def test_an_idle_intake_backs_off_to_its_ceiling_and_polls_rarely():
    clock, inbox = _serve(60.0, {})

    assert clock.waits[:2] == [POLL_MIN, POLL_MAX]
    assert max(clock.waits) == IDLE_MAX <= 0.1  # a lease request waits at most that much more
    assert clock.waits[-10:] == [IDLE_MAX] * 10
    # an idle minute: about 1/IDLE_MAX polls a second once quiet (at POLL_MAX alone: 6,000 polls)
    assert inbox.drains < 1_000


def test_an_intake_that_takes_something_polls_at_once_again():
    clock, inbox = _serve(10.0, {5.0: [3], 7.0: [BATCH, BATCH, 0]})

    starts, at = [], 0.0  # the simulated time each wait began
    for pause in clock.waits:
        starts.append(at)
        at += pause
    first = next(i for i, start in enumerate(starts) if start >= 5.0)  # after the drain that took 3
    assert clock.waits[first - 1] == IDLE_MAX  # it was idle
    assert clock.waits[first] == POLL_MIN  # the shortest pause at once
    quiet = clock.waits[first + 1 : first + int(IDLE_AFTER / POLL_MAX)]
    assert set(quiet) == {POLL_MAX}  # and no backoff past POLL_MAX for a quiet second
    # two full batches: no pause between them nor after them, then POLL_MIN after the empty drain
    batches = next(i for i, start in enumerate(starts) if start >= 7.0)
    assert clock.waits[batches - 1] == IDLE_MAX
    assert clock.waits[batches] == POLL_MIN
    assert inbox.drains == len(clock.waits) + 2  # the two full batches were followed by no wait
