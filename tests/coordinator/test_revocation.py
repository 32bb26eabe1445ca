"""Withdrawing a revoked volunteer from rounds, in a real Redis (no ACL users: Redis 6 is enough)."""

from __future__ import annotations

import pytest

from broker import keys
from broker.run_config import RunConfig
from coordinator.runs import identities, revocation
from coordinator.store import Store


@pytest.fixture
def store(redis_server):
    s = Store(redis_server.client())
    s.create_run("r", RunConfig(job="tiny"), b"model-v0")
    return s


def copy(volunteer: str, shard: int) -> str:
    return keys.accepted_upload("r", 1, volunteer, shard, "ab" * 8)


def lease(store: Store, field: str, volunteer: str, state: str) -> None:
    store.redis.hset(keys.leases("r", 1), field, f"{volunteer}|{'ab' * 8}|0|9999999999|{state}")


def test_a_revoked_volunteers_copies_stop_counting_and_a_replica_takes_its_place(store):
    # arrange: alice's copy of shard 0 (bob holds its replica), alice's of shard 1, carol's of shard 2
    store.rounds.open("r", shards=4, quorum=4, deadline=60)
    store.rounds.replicate("r", 1, [0])
    for shard, volunteer in ((0, "alice"), (0, "bob"), (1, "alice"), (2, "carol")):
        store.redis.set(copy(volunteer, shard), b"bytes")
        store.rounds.accept("r", 1, shard, copy(volunteer, shard), f"d{shard}{volunteer}", volunteer)
    lease(store, "0", "alice", "done")
    lease(store, "0:r", "bob", "done")
    lease(store, "1", "alice", "done")
    lease(store, "2", "carol", "done")
    lease(store, "3", "alice", "live")
    # act
    released, withdrawn = revocation._withdraw(store.redis, "alice")
    # assert
    assert released == 3 and sorted(withdrawn) == sorted([copy("alice", 0), copy("alice", 1)])
    assert store.rounds.accepted_uploads("r", 1) == {0: copy("bob", 0), 2: copy("carol", 2)}
    info = store.rounds.info("r", 1) or {}
    assert (info["accepted"], info["replicas"]) == (2, 0)
    assert store.rounds.wants_replica("r", 1, 0)  # bob's copy is shard 0's now: a new replica is wanted
    held = store.redis.hgetall(keys.leases("r", 1))
    assert set(held) == {b"0", b"2", b"x:alice"} and held[b"0"].startswith(b"bob|")


def test_the_merge_leaves_out_copies_of_revoked_volunteers(store):
    copies = {0: copy("alice", 0), 1: copy("bob", 1)}
    assert revocation.split_revoked(store.redis, copies) == (copies, {})
    identities.mark_revoked(store.redis, "alice")
    assert revocation.split_revoked(store.redis, copies) == ({1: copy("bob", 1)}, {0: "alice"})
