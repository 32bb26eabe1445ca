"""Leases on a real Redis: who is given a shard, for how long, and what is offered again."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from broker import keys
from coordinator.merging.aggregator import Aggregator
from coordinator.rounds.leases import Leases, Request, fair_share
from coordinator.store import Store

TINY = "tests.fixtures.jobs_tiny:make_job"


@pytest.fixture
def leases(processes, redis_server) -> Leases:
    processes.json("init", "--run", "r", "--job", TINY, "--shards", "4", "--lease", "20")
    store = Store(redis_server.client())
    store.rounds.open("r", 4, 4, 600.0)
    return Aggregator(store, processes.home).leases


def _ask(leases: Leases, who: str, shard: int, now: float, nonce: str | None = None) -> str:
    nonce = nonce or f"{who.encode().hex():0<8}{shard:08x}"
    return leases.answer([Request(who, "lease", "r", 1, shard, nonce)], now=now)[0]


def test_a_shard_has_one_holder_until_its_lease_lapses_and_then_it_is_offered_again(leases):
    now = float(leases.store.rounds.info("r", 1)["posted_at"])  # type: ignore[index]
    assert _ask(leases, "ann", 0, now) == "granted"
    assert _ask(leases, "ann", 0, now + 1) == "granted"  # the same request again: the same answer
    assert _ask(leases, "ann", 0, now + 1, nonce="a" * 32) == "leased"  # not twice to its holder
    assert _ask(leases, "ben", 0, now + 1) == "leased"
    assert _ask(leases, "ben", 0, now + 21) == "granted"  # ann's lapsed: ben's now
    ((held,),) = [[x for x in found if x.field == "0"] for found in leases.holders([("r", 1, 0)])]
    assert held.volunteer == "ben"
    # nobody took shards 1-3 within min(10, 20/2) s of the round's posting: offered again, once
    posted: list[tuple[str, dict[str, Any], str]] = []
    leases._checked = 0.0
    assert leases.reoffer(lambda *p: posted.append(p), now=now + 11) == 3
    assert sorted(p[1]["shard"] for p in posted) == [1, 2, 3] and "upload" not in posted[0][1]
    assert leases.reoffer(lambda *p: posted.append(p), now=now + 12.5) == 0


def test_the_fair_share_holds_while_another_is_online_and_not_once_it_dropped_out(leases):
    now = float(leases.store.rounds.info("r", 1)["posted_at"])  # type: ignore[index]
    assert _ask(leases, "ann", 0, now) == "granted"
    assert [_ask(leases, "mal", s, now) for s in (1, 2, 3)] == ["granted", "granted", "share"]
    (lease,) = leases.holders([("r", 1, 0)])[0]
    leases.settle([("r", 1, lease, "release")])  # ann's upload was refused: she dropped out
    assert _ask(leases, "mal", 3, now + 1) == "granted"
    assert fair_share(4, 0.5, 2) == 2 and fair_share(2, 0.5, 2) == 1 and fair_share(3, 0.9, 2) == 2
    assert fair_share(4, 0.5, 1) == 4 and fair_share(4, 1.0, 5) == 4


def test_a_closed_round_and_an_accepted_shard_are_leased_to_no_one(leases):
    now = float(leases.store.rounds.info("r", 1)["posted_at"])  # type: ignore[index]
    assert _ask(leases, "ann", 0, now) == "granted"
    (lease,) = leases.holders([("r", 1, 0)])[0]
    leases.settle([("r", 1, lease, "done")])
    assert _ask(leases, "ben", 0, now + 100) == "leased"  # done is final, lapsed or not
    leases.store.redis.hset(keys.round_accepted("r", 1), 0, "x")
    assert _ask(leases, "ben", 0, now + 100) == "taken"
    leases.store.rounds.abort("r", 1)
    assert _ask(leases, "ben", 1, now) == "closed"
    assert leases.answer([Request("ben", "lease", "nope", 1, 0, "ab" * 16)]) == ["unknown"]


def test_an_asynchronous_job_nobody_holds_is_answered_dropped_so_a_fresh_one_is_posted(
    processes, redis_server
):
    processes.json(
        "init", "--run", "a", "--job", TINY, "--shards", "2", "--mode", "async", "--buffer", "1",
        "--lease", "8",
    )  # fmt: skip
    store = Store(redis_server.client())
    store.rounds.open("a", 0, 1, 600.0)
    store.rounds.add_jobs("a", 1, 2)
    leases = Aggregator(store, processes.home).leases
    assert leases.answer([Request("ann", "lease", "a", 1, 0, "ab" * 16)], now=1000.0) == ["granted"]
    posted: list[Any] = []
    for now in (1000.0, 1005.0):  # job 1 first seen unheld, then held for min(10, 8/2) s
        leases._checked = 0.0
        assert leases.reoffer(lambda *p: posted.append(p), now=now) == 0 and posted == []
    assert store.rounds.outstanding("a") == 1  # job 1 answered "dropped"; ann's job 0 still out
    assert leases.answer([Request("ben", "lease", "a", 1, 1, "cd" * 16)], now=1006.0) == ["taken"]


def test_requests_whose_drain_fails_are_read_on_the_next_drain(leases):
    # The drain of the volunteers' request lists fails after the hints naming them were taken (on
    # a replica Sentinel promoted, redis-py may send a script the node has not loaded yet; here, a
    # key of the wrong type): the hints go back, so the requests are read once the failure passes.
    client = leases.redis
    client.rpush(keys.lease_requests(), "ann")
    client.set(keys.lease_inbox("ann"), "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        leases.drain()
    assert client.lrange(keys.lease_requests(), 0, -1) == [b"ann"]
    client.delete(keys.lease_inbox("ann"))
    client.rpush(keys.lease_inbox("ann"), b"junk")
    assert leases.drain() == 1
    assert client.llen(keys.lease_inbox("ann")) == 0


def test_a_refused_lease_offers_its_free_shard_again_at_once_at_most_once_per_offer_period(leases):
    # mal holds its share (2 of 4 while ann is online) and asks for shard 3, which nobody holds:
    # refused 'share', and the message it took is gone. The shard is posted again at once, even
    # with other messages waiting on the run's queue, but however often it is refused, and by
    # whom, at most once per offer period (min(10, 20/2) s): asking cannot make the aggregator loop.
    now = float(leases.store.rounds.info("r", 1)["posted_at"])  # type: ignore[index]
    assert _ask(leases, "ann", 0, now) == "granted"
    assert [_ask(leases, "mal", s, now) for s in (1, 2)] == ["granted", "granted"]
    leases.redis.rpush(keys.TRAIN_QUEUE, b"another shard's message")
    posted: list[tuple[str, dict[str, Any], str]] = []
    leases._checked = now + 5  # the routine look (once a second) just ran: what follows is the refusal's
    for step in range(5):
        at = now + 5 + step / 10
        assert _ask(leases, "mal", 3, at, nonce=f"{step:032x}") == "share"
        leases.reoffer(lambda *p: posted.append(p), now=at)
    assert [(p[0], p[1]["shard"], p[2]) for p in posted] == [("train_shard", 3, keys.TRAIN_QUEUE)]
    # a refusal for a shard someone holds posts nothing: its holder answers it
    assert _ask(leases, "ben", 0, now + 6) == "leased"
    leases.reoffer(lambda *p: posted.append(p), now=now + 6)
    assert len(posted) == 1
    offers = leases.redis.hgetall(keys.offers("r", 1))
    assert offers[b"3:refused"] == b"1" and b"3:waited" not in offers, offers
    # an offer period later, a refusal may post it once more
    assert _ask(leases, "mal", 3, now + 15.5, nonce="f" * 32) == "share"
    leases.reoffer(lambda *p: posted.append(p), now=now + 15.5)
    assert [p[1]["shard"] for p in posted] == [3, 3]
    assert leases.redis.hget(keys.offers("r", 1), "3:refused") == b"2"
