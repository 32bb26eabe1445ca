"""The round state machine in a real Redis: every transition atomic, every failure distinct."""

from __future__ import annotations

import threading
import time

import pytest

from broker import keys
from broker.errors import UnknownRun
from broker.run_config import RunConfig
from coordinator.errors import RoundOpen, RunExists
from coordinator.store import Store
from tests.conftest import wait_until

POLL = 0.01  # leases here last 0.05-0.2 s


@pytest.fixture
def store(redis_server):
    s = Store(redis_server.client())
    s.create_run("r", RunConfig(job="tiny"), b"model-v0")
    return s


def accept(store: Store, shard: int, key: str) -> tuple[str, bool]:
    """Count an upload of round 1 whose bytes are told apart by its key."""
    return store.rounds.accept("r", 1, shard, key, f"sha256-of-{key}", "alice")


def test_a_shard_is_accepted_once_and_its_redelivered_validation_is_a_repeat(store):
    info = store.rounds.open("r", shards=3, quorum=2, deadline=60)
    first = keys.upload("alice", "r", info["round"], 0, "aa")
    assert accept(store, 0, first) == ("accepted", False)
    assert accept(store, 0, first) == ("repeat", False)
    assert accept(store, 0, keys.upload("bob", "r", 1, 0, "bb")) == ("duplicate", False)
    assert store.rounds.info("r", 1)["accepted"] == 1


def test_quorum_makes_the_round_due_and_stays_due_for_repeats(store):
    store.rounds.open("r", shards=3, quorum=2, deadline=60)
    accept(store, 0, "k0")
    assert accept(store, 1, "k1") == ("accepted", True)
    assert accept(store, 1, "k1") == ("repeat", True)


def test_only_one_of_two_aggregators_claims_a_due_round(store):
    store.rounds.open("r", shards=1, quorum=1, deadline=60)
    accept(store, 0, "k0")
    assert store.rounds.claim("r", 1, "agg-a") == "claimed"
    assert store.rounds.claim("r", 1, "agg-b") == "held"


def test_a_round_is_not_claimed_before_quorum_or_deadline(store):
    store.rounds.open("r", shards=2, quorum=2, deadline=60)
    accept(store, 0, "k0")
    assert store.rounds.claim("r", 1, "agg") == "not-due"


def test_a_crashed_aggregators_claim_can_be_taken_over_after_its_lease(store):
    store.rounds.open("r", shards=1, quorum=1, deadline=60)
    accept(store, 0, "k0")
    assert store.rounds.claim("r", 1, "dead", lease=0.2) == "claimed"
    assert store.rounds.claim("r", 1, "alive") == "held"
    wait_until(lambda: store.rounds.claim("r", 1, "alive") == "claimed", "dead's claim to lapse", poll=POLL)
    assert store.rounds.renew("r", 1, "dead") == "lost"
    assert store.rounds.renew("r", 1, "alive") == "renewed"


def test_the_next_version_is_published_exactly_once(store):
    store.rounds.open("r", shards=1, quorum=1, deadline=60)
    accept(store, 0, "k0")
    store.rounds.claim("r", 1, "agg", lease=0.1)
    staged_a = store.stage_model("r", 1, "agg", b"model-v1-a")
    wait_until(lambda: store.rounds.claim("r", 1, "other") == "claimed", "agg's claim to lapse", poll=POLL)
    staged_b = store.stage_model("r", 1, "other", b"model-v1-b")
    assert store.rounds.commit("r", 1, "other", 0, {"status": "done"}, staged_b) == "done"
    assert store.rounds.commit("r", 1, "agg", 0, {"status": "done"}, staged_a) == "lost"
    assert store.version("r") == 1
    assert store.model_blob("r", 1) == b"model-v1-b"
    assert store.redis.ttl(keys.model("r", 1)) == -1, "a published version must never expire"
    assert store.rounds.claim("r", 1, "late-agg") == "closed"


def test_a_commit_on_a_stale_base_fails_the_round_instead_of_looping(store):
    store.rounds.open("r", shards=1, quorum=1, deadline=60)
    accept(store, 0, "k0")
    store.rounds.claim("r", 1, "agg")
    store.redis.set(keys.run_version("r"), 5)  # the run moved on behind this round's back
    staged = store.stage_model("r", 1, "agg", b"model")
    assert store.rounds.commit("r", 1, "agg", 0, {"status": "done"}, staged) == "stale-base"
    info = store.rounds.info("r", 1)
    assert info["status"] == "failed" and "base version" in info["reason"]
    assert ("r", 1) not in store.rounds.due(time.time() + 3600)


def test_a_failed_round_records_its_reason_and_leaves_the_model(store):
    store.rounds.open("r", shards=1, quorum=1, deadline=0.01)
    wait_until(lambda: store.rounds.claim("r", 1, "agg") == "claimed", "the deadline", poll=POLL)
    assert store.rounds.commit("r", 1, "agg", 0, {}, None, reason="no accepted deltas") == "failed"
    assert store.rounds.info("r", 1)["reason"] == "no accepted deltas"
    assert store.version("r") == 0


def test_results_after_the_round_closed_count_as_late(store):
    store.rounds.open("r", shards=2, quorum=1, deadline=60)
    accept(store, 0, "k0")
    store.rounds.claim("r", 1, "agg")
    assert accept(store, 1, "k1") == ("late", False)
    assert store.rounds.reject("r", 1, 1, "bob", "non-finite values") == "late"
    assert store.rounds.info("r", 1)["late"] == 2


def test_a_rejection_delivered_twice_is_counted_once(store):
    store.rounds.open("r", shards=2, quorum=2, deadline=60)
    assert store.rounds.reject("r", 1, 1, "bob", "non-finite values", "t1") == "rejected"
    assert store.rounds.reject("r", 1, 1, "bob", "non-finite values", "t1") == "repeat"
    assert store.rounds.info("r", 1)["rejected"] == 1
    expected = [{"shard": 1, "volunteer": "bob", "reason": "non-finite values"}]
    assert store.rounds.rejections("r", 1) == expected


def test_a_round_past_its_deadline_is_due_and_a_second_round_waits(store):
    store.rounds.open("r", shards=2, quorum=2, deadline=0.01)
    wait_until(lambda: ("r", 1) in store.rounds.due(), "the round to be due", poll=POLL)
    with pytest.raises(RoundOpen):
        store.rounds.open("r", shards=2, quorum=2, deadline=60)


def test_two_coordinators_opening_at_once_open_exactly_one_round(store):
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def open_one() -> None:
        start.wait()
        try:
            store.rounds.open("r", shards=2, quorum=2, deadline=60)
            outcomes.append("opened")
        except RoundOpen:
            outcomes.append("refused")

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["opened"] + ["refused"] * 7
    assert store.rounds.count("r") == 1


def test_opening_a_round_of_an_unknown_run_is_refused(store):
    with pytest.raises(UnknownRun, match="ghost"):
        store.rounds.open("ghost", shards=1, quorum=1, deadline=60)


def test_runs_are_never_overwritten_and_unknown_runs_are_named(store):
    with pytest.raises(RunExists):
        store.create_run("r", RunConfig(job="other"), b"x")
    with pytest.raises(UnknownRun, match="ghost"):
        store.run_config("ghost")


def test_an_open_round_can_be_aborted_by_hand_and_the_next_one_opens(store):
    store.rounds.open("r", shards=2, quorum=2, deadline=60)
    assert store.rounds.abort("r", 1) == "aborted"
    info = store.rounds.info("r", 1)
    assert info["status"] == "failed" and info["reason"] == "aborted"
    assert store.rounds.abort("r", 1) == "not-active"
    assert store.rounds.claim("r", 1, "agg") == "closed"
    assert store.rounds.open("r", shards=2, quorum=2, deadline=60)["round"] == 2


def test_bytes_identical_to_an_accepted_upload_count_once(store):
    store.rounds.open("r", shards=3, quorum=3, deadline=60)
    assert store.rounds.accept("r", 1, 0, "k0", "same-bytes", "alice") == ("accepted", False)
    assert store.rounds.accept("r", 1, 1, "k1", "same-bytes", "bob") == ("identical", False)
    assert store.rounds.info("r", 1)["accepted"] == 1


def test_every_claim_counts_as_an_attempt(store):
    store.rounds.open("r", shards=1, quorum=1, deadline=0.01)
    wait_until(lambda: store.rounds.claim("r", 1, "a", lease=0.05) == "claimed", "the deadline", poll=POLL)
    wait_until(
        lambda: store.rounds.claim("r", 1, "b", lease=0.05) == "claimed", "a's claim to lapse", poll=POLL
    )
    assert store.rounds.info("r", 1)["attempts"] == 2


def test_a_replicated_shard_keeps_a_second_volunteers_upload_and_the_round_waits_for_it(store):
    store.rounds.open("r", shards=2, quorum=2, deadline=60)
    store.rounds.replicate("r", 1, [1])
    first = keys.accepted_upload("r", 1, "alice", 1, "aa")
    assert store.rounds.accept("r", 1, 1, first, "d1", "alice") == ("accepted", False)
    assert store.rounds.accept("r", 1, 0, "k0", "d0", "bob") == ("accepted", False)  # quorum, no replica
    assert store.rounds.claim("r", 1, "agg") == "not-due"
    assert store.rounds.due() == {}
    again = keys.accepted_upload("r", 1, "alice", 1, "bb")
    assert store.rounds.accept("r", 1, 1, again, "d2", "alice") == ("duplicate", False)  # same volunteer
    assert store.rounds.wants_replica("r", 1, 1)
    second = keys.accepted_upload("r", 1, "carol", 1, "cc")
    assert store.rounds.accept("r", 1, 1, second, "d3", "carol") == ("replica", True)
    assert store.rounds.accept("r", 1, 1, second, "d3", "carol") == ("repeat", True)
    assert store.rounds.replicas("r", 1) == {1: second} and not store.rounds.wants_replica("r", 1, 1)
    assert store.rounds.info("r", 1)["accepted"] == 2
    assert store.rounds.claim("r", 1, "agg") == "claimed"
