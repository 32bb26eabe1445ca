"""Round bookkeeping in a real Redis: every decision happens at most once."""

from __future__ import annotations

import time

import pytest

from coordinator.store import RoundOpen, RunExists, Store, UnknownRun


@pytest.fixture
def store(redis_server):
    s = Store(redis_server.client())
    s.create_run("r", {"job": "tiny"}, b"model-v0")
    return s


def test_a_shard_is_accepted_once_and_its_redelivered_validation_is_a_repeat(store):
    info = store.open_round("r", shards=3, quorum=2, deadline=60)
    first = store.upload_key("alice", "r", info["round"], 0, "aa")
    assert store.accept("r", 1, 0, first) == ("accepted", False)
    assert store.accept("r", 1, 0, first) == ("repeat", False)
    assert store.accept("r", 1, 0, store.upload_key("bob", "r", 1, 0, "bb")) == ("duplicate", False)
    assert store.round_info("r", 1)["accepted"] == 1


def test_quorum_makes_the_round_due_and_stays_due_for_repeats(store):
    store.open_round("r", shards=3, quorum=2, deadline=60)
    store.accept("r", 1, 0, "k0")
    assert store.accept("r", 1, 1, "k1") == ("accepted", True)
    assert store.accept("r", 1, 1, "k1") == ("repeat", True)


def test_only_one_of_two_aggregators_claims_a_due_round(store):
    store.open_round("r", shards=1, quorum=1, deadline=60)
    store.accept("r", 1, 0, "k0")
    assert store.claim("r", 1, "agg-a") is True
    assert store.claim("r", 1, "agg-b") is False


def test_a_round_is_not_claimed_before_quorum_or_deadline(store):
    store.open_round("r", shards=2, quorum=2, deadline=60)
    store.accept("r", 1, 0, "k0")
    assert store.claim("r", 1, "agg") is False


def test_a_crashed_aggregators_claim_can_be_taken_over_after_its_lease(store):
    store.open_round("r", shards=1, quorum=1, deadline=60)
    store.accept("r", 1, 0, "k0")
    assert store.claim("r", 1, "dead", lease=0.2)
    assert not store.claim("r", 1, "alive")
    time.sleep(0.3)
    assert store.claim("r", 1, "alive")
    assert not store.renew_claim("r", 1, "dead")


def test_the_next_version_is_published_exactly_once(store):
    store.open_round("r", shards=1, quorum=1, deadline=60)
    store.accept("r", 1, 0, "k0")
    store.claim("r", 1, "agg", lease=0.1)
    staged_a = store.stage_model("r", 1, "agg", b"model-v1-a")
    time.sleep(0.2)
    store.claim("r", 1, "other")
    staged_b = store.stage_model("r", 1, "other", b"model-v1-b")
    assert store.finish_round("r", 1, "other", 0, {"status": "done"}, staged_b)
    assert not store.finish_round("r", 1, "agg", 0, {"status": "done"}, staged_a)
    assert store.version("r") == 1
    assert store.model_blob("r", 1) == b"model-v1-b"
    assert store.redis.ttl("ct:run:r:model:1") == -1, "a published version must never expire"


def test_results_after_the_round_closed_count_as_late(store):
    store.open_round("r", shards=2, quorum=1, deadline=60)
    store.accept("r", 1, 0, "k0")
    store.claim("r", 1, "agg")
    assert store.accept("r", 1, 1, "k1") == ("late", False)
    assert store.reject("r", 1, 1, "bob", "non-finite values") == "late"
    assert store.round_info("r", 1)["late"] == 2


def test_a_rejection_delivered_twice_is_counted_once(store):
    store.open_round("r", shards=2, quorum=2, deadline=60)
    assert store.reject("r", 1, 1, "bob", "non-finite values", "t1") == "rejected"
    assert store.reject("r", 1, 1, "bob", "non-finite values", "t1") == "repeat"
    assert store.round_info("r", 1)["rejected"] == 1
    assert store.rejections("r", 1) == [{"shard": 1, "volunteer": "bob", "reason": "non-finite values"}]


def test_a_round_past_its_deadline_is_due_and_a_second_round_waits(store):
    store.open_round("r", shards=2, quorum=2, deadline=0.01)
    time.sleep(0.05)
    assert ("r", 1) in store.due_rounds()
    with pytest.raises(RoundOpen):
        store.open_round("r", shards=2, quorum=2, deadline=60)


def test_runs_are_never_overwritten_and_unknown_runs_are_named(store):
    with pytest.raises(RunExists):
        store.create_run("r", {"job": "other"}, b"x")
    with pytest.raises(UnknownRun, match="ghost"):
        store.run_config("ghost")
