"""Rounds survive dropped volunteers, stragglers and restarts (real processes, real Redis).

Each scenario prints how long its recovery took (pytest -s shows it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from broker import blobs, keys
from broker.settings import Settings
from coordinator.merging.aggregator import Aggregator
from coordinator.rounds.leases import Request
from coordinator.store import Store
from coordinator.views.documents import round_record
from serialization import loads
from tasks.app import make_app
from tests.conftest import wait_until
from tests.fixtures.attacker import delta_blob

SLOW_JOB = "tests.fixtures.jobs_slow:make_job"
ALLOW = ("--allow-job", SLOW_JOB)
VISIBILITY = "6"


@pytest.fixture
def cluster(processes, redis_server):
    """Processes with a short visibility timeout, plus a Store on the same Redis."""
    processes.extra_env["CROWDTRAIN_VISIBILITY_TIMEOUT"] = VISIBILITY
    processes.store = Store(redis_server.client())
    return processes


def _init(cluster, *flags: str) -> None:
    # float32 deltas: some tests write a volunteer's upload themselves (_honest_upload)
    cluster.json(
        "init", "--run", "r", "--job", SLOW_JOB, "--local-steps", "3", "--compression", "none", *flags
    )


def _round(cluster, number: int = 1) -> dict:
    return cluster.store.rounds.info("r", number) or {}


def _credit(cluster) -> dict[str, int]:
    return {name: int(v.get("shards_done", 0)) for name, v in cluster.store.volunteers().items()}


def _holder(cluster, shard: int, number: int = 1) -> str | None:
    """The volunteer holding the shard's lease: it took the shard and is training it."""
    lease = cluster.store.redis.hget(keys.leases("r", number), str(shard))
    return lease.decode().split("|", 1)[0] if lease else None


def _answered(cluster, volunteer: str, number: int) -> list[dict]:
    """What ``volunteer`` answered for each shard of round ``number`` it finished (its own log)."""
    return [r for r in cluster.results(volunteer) if r["round"] == number]


def _paused(cluster, volunteer: str) -> bool:
    """``volunteer`` answers and consumes no queue (what ``coordinator status`` shows as paused)."""
    app = make_app(Settings(broker_url=cluster.broker))
    try:
        node = f"{volunteer}@{socket.gethostname()}"
        replies = app.control.inspect(destination=[node], limit=1, timeout=1.0).active_queues() or {}
    finally:
        app.close()
    return replies.get(node) == []


def _judged(cluster, number: int = 1) -> int:
    """Uploads of the round the trusted side has counted, whatever their outcome."""
    info = _round(cluster, number)
    return sum(int(info.get(field) or 0) for field in ("accepted", "late", "rejected"))


def test_extra_shards_of_an_aggregated_round_are_skipped_not_trained(cluster):
    cluster.aggregator()
    cluster.volunteer("v1", *ALLOW, CROWDTRAIN_TEST_STEP_SECONDS="0.2")
    _init(cluster)
    document = cluster.json(
        "post-round", "--run", "r", "--shards", "6", "--quorum", "2", "--deadline", "60", "--wait"
    )
    record = document["rounds"][0]
    assert record["status"] == "done" and record["model_version"] == 1
    assert record["accepted"] == 2
    # settled: v1 has answered every one of the six shards, and the trusted side has judged
    # each upload it sent; only then can a shard trained after the merge no longer turn up
    answers = wait_until(
        lambda: len(_answered(cluster, "v1", 1)) >= 6 and _answered(cluster, "v1", 1),
        "v1 to answer all six shards",
        60,
        cluster,
    )
    trained = sorted(r["shard"] for r in answers if "skipped" not in r)
    assert len(trained) <= 3, f"shards {trained} trained after quorum 2 of 6"
    wait_until(
        lambda: _judged(cluster) >= len(trained), "the trusted side to judge v1's uploads", 60, cluster
    )
    credited = sum(_credit(cluster).values())
    assert credited <= 3, f"{credited} shards credited after quorum 2 of 6"
    assert _round(cluster)["accepted"] <= 3 and _round(cluster)["late"] <= 1


def test_a_round_nobody_trains_fails_at_its_deadline_and_keeps_the_model(cluster):
    cluster.aggregator()
    _init(cluster)
    document = cluster.json("post-round", "--run", "r", "--shards", "2", "--deadline", "2", "--wait")
    record = document["rounds"][0]
    assert record["status"] == "failed"
    assert record["model_version"] == 0 and record["accepted"] == 0
    assert document["final"]["model_version"] == 0
    # the run goes on: the next round opens on the unchanged model
    cluster.volunteer("v1", *ALLOW)
    again = cluster.json("post-round", "--run", "r", "--shards", "1", "--deadline", "60", "--wait")
    assert again["rounds"][0]["model_version"] == 1


def test_a_shard_of_a_killed_volunteer_is_redelivered_to_another(cluster):
    cluster.aggregator()
    doomed = cluster.volunteer("doomed", *ALLOW, CROWDTRAIN_TEST_STEP_SECONDS="3")
    _init(cluster, "--deadline", "120")
    cluster.cli("post-round", "--run", "r", "--shards", "1")
    wait_until(lambda: _holder(cluster, 0) == "doomed", "doomed to lease the shard and train it", 60, cluster)
    cluster.kill(doomed)  # mid-shard: 3 steps of 3 s
    killed_at = time.monotonic()
    cluster.volunteer("rescuer", *ALLOW)
    wait_until(lambda: _round(cluster).get("status") == "done", "the round to finish", 60, cluster)
    recovery = time.monotonic() - killed_at
    print(f"\nkilled volunteer: shard redelivered and round done {recovery:.1f}s after SIGKILL")
    # done with one accepted shard: redelivered and trained before the 120 s deadline, which
    # would have failed a round with none
    assert cluster.store.version("r") == 1
    assert _round(cluster)["accepted"] == 1 and _round(cluster)["late"] == 0


def test_a_shard_longer_than_the_visibility_timeout_is_trained_once(cluster):
    cluster.extra_env["CROWDTRAIN_VISIBILITY_TIMEOUT"] = "3"
    cluster.aggregator()
    slow = cluster.volunteer("slow", *ALLOW, CROWDTRAIN_TEST_STEP_SECONDS="3")  # 3 steps: ~9 s
    _init(cluster, "--deadline", "120")
    cluster.cli("post-round", "--run", "r", "--shards", "1")
    wait_until(lambda: _holder(cluster, 0) == "slow", "slow to lease the shard and train it", 60, cluster)
    cluster.volunteer("idle", *ALLOW)
    wait_until(lambda: _round(cluster).get("status") == "done", "the round to finish", 90, cluster)
    assert _credit(cluster).get("idle", 0) == 0, _credit(cluster)  # credit is given at the merge
    # settled: slow answered the shard and, stopped, has acked it: no copy can come back after
    # that. Idle alone then trains round 2, whose shard is queued behind any copy put back before.
    wait_until(lambda: _answered(cluster, "slow", 1), "slow to answer its shard", 60, cluster)
    cluster.kill(slow, signal.SIGTERM)
    cluster.cli("post-round", "--run", "r", "--shards", "1")
    wait_until(lambda: _round(cluster, 2).get("status") == "done", "idle to train round 2", 90, cluster)
    trained = [(v, r) for v in ("slow", "idle") for r in _answered(cluster, v, 1) if "skipped" not in r]
    assert [v for v, _ in trained] == ["slow"], f"the shard was trained more than once: {trained}"
    assert _round(cluster)["late"] == 0


def test_a_killed_aggregator_is_replaced_and_versions_stay_consecutive(cluster):
    first = cluster.aggregator("agg-1")
    cluster.volunteer("v1", *ALLOW)
    cluster.volunteer("v2", *ALLOW)
    _init(cluster, "--shards", "2", "--deadline", "120")
    run = subprocess.Popen(
        [sys.executable, "-m", "cli.coordinator", "run", "--run", "r", "--rounds", "3", "--json"],
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cluster.home,
    )
    cluster.started.append(run)
    wait_until(lambda: cluster.store.version("r") >= 1, "version 1", 90, cluster)
    cluster.kill(first)
    killed_at = time.monotonic()
    cluster.aggregator("agg-2")
    out, err = run.communicate(timeout=150)
    assert run.returncode == 0, err[-2000:] + cluster.log_tail()
    import json

    document = json.loads(out)
    recovery = time.monotonic() - killed_at
    print(f"\nkilled aggregator: run finished {recovery:.1f}s after SIGKILL")
    assert recovery < 120, "recovery waited for the round's 120 s deadline instead of taking the round over"
    assert [r["model_version"] for r in document["rounds"]] == [1, 2, 3]
    assert all(r["accepted"] <= r["shards"] for r in document["rounds"])


def _honest_upload(cluster, volunteer: str, number: int, shard: int) -> str:
    """Write a plausible delta of round ``number`` as ``volunteer`` would, under its lease, unannounced."""
    weights, _ = loads(cluster.store.model_blob("r", 0))
    delta = {name: torch.full_like(tensor, 0.01) for name, tensor in weights.items()}
    token = uuid.uuid4().hex
    leases = Aggregator(cluster.store, cluster.home).leases
    assert leases.answer([Request(volunteer, "lease", "r", number, shard, token)]) == ["granted"]
    blob = delta_blob(delta, "r", number, shard, version=0)
    blobs.write(cluster.store.redis, keys.upload(volunteer, "r", number, shard, token), blob)
    return token


def test_a_validation_cut_short_after_the_move_resumes_from_the_copy(cluster):
    """The aggregator died after moving the upload out of the volunteer's reach; the message came back."""
    _init(cluster, "--deadline", "120")
    cluster.cli("post-round", "--run", "r", "--shards", "2")
    token = _honest_upload(cluster, "v1", 1, 0)
    moved = keys.accepted_upload("r", 1, "v1", 0, token)
    assert cluster.store.take_upload(keys.upload("v1", "r", 1, 0, token), moved, 1 << 20) is not None
    aggregator = Aggregator(cluster.store, cluster.home)
    assert aggregator.validate("r", 1, 0, token, "v1").outcome == "accepted"
    kept = aggregator.intake.sketches.get(moved)  # its norm and sketch, for this process's merge
    assert kept is not None and kept[0] > 0 and kept[1].dtype == torch.float64, kept
    assert aggregator.validate("r", 1, 0, token, "v1").outcome == "repeat"
    assert cluster.store.rounds.accepted_uploads("r", 1) == {0: moved}
    assert cluster.store.get_upload(moved) is not None, "the accepted copy must stay for the merge"
    assert aggregator.validate("r", 1, 1, "ab" * 16, "v1").outcome == "unleased"


def test_a_low_reputation_volunteers_shard_is_checked_again_and_a_trusted_ones_is_not(cluster):
    """Adaptive replication: beyond the fixed fraction, poor records get their shards trained twice."""
    _init(cluster, "--replicate", "0.01", "--shards", "4", "--deadline", "120")
    cluster.cli("post-round", "--run", "r")
    fixed = {int(x) for x in cluster.store.redis.smembers(keys.round_replicated("r", 1))}
    free = sorted(set(range(4)) - fixed)
    assert len(fixed) == 1 and len(free) == 3  # ceil(0.01 * 4) shards posted twice
    cluster.store.set_reputations({"shady": 0.0, "trusted": 0.9})
    aggregator = Aggregator(cluster.store, cluster.home)
    checked = aggregator.validate("r", 1, free[0], _honest_upload(cluster, "shady", 1, free[0]), "shady")
    trusted = aggregator.validate("r", 1, free[1], _honest_upload(cluster, "trusted", 1, free[1]), "trusted")
    assert checked.outcome == trusted.outcome == "accepted"
    assert checked.retry is not None and checked.retry["shard"] == free[0], "shady's shard goes out again"
    assert trusted.retry is None
    marked = {int(x) for x in cluster.store.redis.smembers(keys.round_replicated("r", 1))}
    assert marked == fixed | {free[0]}
    assert int(_round(cluster)["replicas_expected"]) == 2


def test_an_upload_whose_validation_message_was_lost_is_still_counted(cluster):
    """kombu loses a message popped by a worker that dies before recording it; the watcher makes it good."""
    cluster.aggregator()
    _init(cluster, "--deadline", "600")
    cluster.cli("post-round", "--run", "r", "--shards", "1")
    _honest_upload(cluster, "v1", 1, 0)  # and never announced, as if the announcement were lost
    wait_until(
        lambda: _round(cluster).get("status") == "done", "the watcher to validate the upload", 90, cluster
    )
    assert _round(cluster)["accepted"] == 1 and cluster.store.version("r") == 1


def test_an_interrupted_run_continues_from_the_last_version(cluster):
    cluster.aggregator()
    cluster.volunteer("v1", *ALLOW, CROWDTRAIN_TEST_STEP_SECONDS="0.3")
    _init(cluster, "--shards", "2", "--deadline", "120")
    run = subprocess.Popen(
        # 50 rounds: interrupted long before it ends, however slow this machine is
        [sys.executable, "-m", "cli.coordinator", "run", "--run", "r", "--rounds", "50"],
        env=cluster.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cluster.home,
    )
    cluster.started.append(run)
    wait_until(lambda: cluster.store.version("r") >= 1, "version 1", 90, cluster)
    run.send_signal(signal.SIGINT)
    assert run.wait(30) == 130
    stopped_at = cluster.store.version("r")
    document = cluster.json("run", "--run", "r", "--rounds", "2")
    versions = [r["model_version"] for r in document["rounds"]]
    # The round left open may finish in the background or under the new run: either way
    # the new run ends two rounds later and every round made exactly one new version.
    assert versions[0] >= stopped_at and versions[1] == versions[0] + 1
    assert document["final"]["model_version"] == versions[-1] == cluster.store.version("r")
    history = [round_record(cluster.store, "r", n) for n in range(1, cluster.store.rounds.count("r") + 1)]
    assert [r["status"] for r in history] == ["done"] * len(history)
    assert [r["model_version"] for r in history] == list(range(1, len(history) + 1))


def test_the_run_continues_after_redis_restarts_and_volunteers_reconnect(cluster, redis_server):
    cluster.aggregator()
    cluster.volunteer("v1", *ALLOW)
    _init(cluster, "--shards", "2", "--deadline", "120")
    assert cluster.json("run", "--run", "r", "--rounds", "1")["final"]["model_version"] == 1
    redis_server.stop()
    redis_server.start()  # same port and folder: the append-only file brings the run back
    restarted_at = time.monotonic()
    document = cluster.json("run", "--run", "r", "--rounds", "1")
    print(f"\nredis restart: next round done {time.monotonic() - restarted_at:.1f}s after restart")
    assert document["rounds"][0]["round"] == 2
    assert document["final"]["model_version"] == 2


def test_a_straggler_does_not_stall_the_round_and_its_result_is_late(cluster):
    cluster.aggregator()
    cluster.volunteer("straggler", *ALLOW, CROWDTRAIN_TEST_STEP_SECONDS="10")  # ~30 s a shard
    cluster.volunteer("quick", *ALLOW)
    _init(cluster, "--deadline", "120")
    # the deadline runs from the post: no start-up may eat it. Quick is started and paused
    # before it (a paused volunteer consumes nothing), so the straggler takes a shard first,
    # and the 20 s leave quick only one short shard to train while the straggler's runs past it.
    cluster.wait_online("aggregator", "straggler", "quick")
    assert cluster.volunteer_cli("pause", "--name", "quick").returncode == 0
    wait_until(lambda: _paused(cluster, "quick"), "quick to stop consuming", 60, cluster)
    cluster.cli("post-round", "--run", "r", "--shards", "2", "--deadline", "20")
    wait_until(lambda: cluster.store.queue_depths()["train"] == 1, "straggler to take a shard", 60, cluster)
    assert cluster.volunteer_cli("resume", "--name", "quick").returncode == 0
    wait_until(
        lambda: _round(cluster).get("status") == "done", "the round to end at its deadline", 60, cluster
    )
    assert _round(cluster)["late"] == 0, "the round ended before the straggler finished"
    assert _round(cluster)["accepted"] == 1
    wait_until(lambda: _round(cluster).get("late") == 1, "the straggler's late result", 60, cluster)
    assert cluster.store.version("r") == 1


def test_ctrl_c_on_a_volunteer_finishes_its_shard_before_it_exits(cluster):
    cluster.aggregator()
    leaving = cluster.volunteer("leaving", *ALLOW, CROWDTRAIN_TEST_STEP_SECONDS="1.5")  # ~5 s a shard
    _init(cluster, "--deadline", "120")
    cluster.cli("post-round", "--run", "r", "--shards", "1")
    wait_until(
        lambda: _holder(cluster, 0) == "leaving", "leaving to lease the shard and train it", 60, cluster
    )
    leaving.send_signal(signal.SIGINT)  # Celery's warm shutdown: finish the shard, then exit
    assert leaving.wait(60) == 0
    wait_until(lambda: _round(cluster).get("status") == "done", "the round to finish", 30, cluster)
    assert _round(cluster)["accepted"] == 1 and cluster.store.version("r") == 1
