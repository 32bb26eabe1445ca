"""Attacks through the queues and kombu's own keys, with nothing but one volunteer's credentials.

Like ``test_attacks``: a Redis 7 whose admin user has a password, a real
aggregator, real volunteers on least-privilege ACL users (docs/SECURITY.md names
the test of each door).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from broker import keys
from tests.conftest import Processes, RedisServer
from tests.fixtures.attacker import envelope
from tests.fixtures.servers import ADMIN_PASSWORD, redis7_binary
from tests.integration.test_attacks import Cluster, _refused

pytestmark = pytest.mark.attack

GATED = "tests.fixtures.jobs_gated:make_job"
SLOW = "tests.fixtures.jobs_slow:make_job"
MAXMEMORY = 64 * 1024 * 1024
CHUNK = 256 * 1024  # bytes of junk a write
PRIORITY_SEP = "\x06\x16"  # kombu: queue name + this + priority step


@pytest.fixture
def queue_cluster(admin_processes: tuple[Processes, redis.Redis]) -> Iterator[Cluster]:
    procs, admin = admin_processes
    yield Cluster(procs, admin)


@pytest.fixture
def full_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on a Redis 7 with ``maxmemory`` and no eviction, as a deployment should run it."""
    binary = redis7_binary("read-only ACL key patterns need Redis 7")
    server = RedisServer(
        tmp_path / "redis7",
        extra=["--requirepass", ADMIN_PASSWORD, "--maxmemory-policy", "noeviction"],
        binary=binary,
    )
    server.url = f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0"
    server.start()
    procs = Processes(tmp_path / "home", server.url)
    yield Cluster(procs, server.client())
    procs.stop_all()
    server.stop()


def _signature(task: str, *args: Any) -> dict[str, Any]:
    return {
        "task": task,
        "args": list(args),
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }


# --- 1. tasks that are not train_shard --------------------------------------------------------
def test_messages_naming_any_other_task_are_dropped_and_every_volunteer_stays_up(queue_cluster):
    cluster = queue_cluster
    cluster.procs.aggregator()
    bob, carol = cluster.volunteer("bob"), cluster.volunteer("carol")
    mallory = cluster.mallory()
    cluster.init("--shards", "2")
    cluster.wait_online("aggregator", "bob", "carol")
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    poison = [
        ("os.system", [["touch /tmp/pwned"], {}, embed], {}),
        ("celery.map", [[_signature("celery.backend_cleanup"), [1, 2]], {}, embed], {}),
        ("celery.starmap", [[_signature("celery.backend_cleanup"), [[1]]], {}, embed], {}),
        ("celery.chunks", [[_signature("celery.backend_cleanup"), [[1]], 1], {}, embed], {}),
        ("celery.backend_cleanup", [[], {}, embed], {}),
        ("celery.accumulate", [[1, 2], {}, embed], {}),
        ("celery.chord_unlock", [["x", []], {}, embed], {}),
        # our own task, asking to store its result (a volunteer may not): trained never, stored never
        (
            "train_shard",
            [[], {"run": "r", "round": 7, "shard": 0, "shards": 1, "version": 0}, embed],
            {"ignore_result": False},
        ),
    ]
    # act: each twice, so that a worker that died restoring the first meets the second
    ids = []
    for _ in range(2):
        for task, body, headers in poison:
            ids.append(str(uuid.uuid4()))
            mallory.redis.lpush("train", envelope("train", task, msgpack.packb(body), ids[-1], **headers))
    cluster.wait_until(lambda: cluster.store.queue_depths()["train"] == 0, "the poison to be taken")
    # assert: the fleet is up and trains a round; nothing was stored, nothing refused by the ACL
    record = cluster.wait_ended(cluster.post())
    assert record["status"] == "done" and record["accepted"] == 2, cluster.procs.log_tail()
    assert bob.poll() is None and carol.poll() is None, cluster.procs.log_tail()
    logs = cluster.procs.log_tail(500_000)
    assert "Unrecoverable error" not in logs and "NoPermissionError" not in logs, logs[-4000:]
    assert "dropped a message naming task 'os.system'" in logs, logs[-4000:]
    assert "dropped a message naming task 'celery.map'" in logs
    assert cluster.admin.hlen("unacked") == 0
    assert not any(cluster.admin.exists(f"celery-task-meta-{i}") for i in ids), "a result was stored"


# --- 1b. kombu's keys take kombu's commands only ------------------------------------------------
def test_kombu_keys_take_only_kombus_commands_and_a_killed_volunteers_shard_comes_back(queue_cluster):
    cluster = queue_cluster
    cluster.procs.extra_env["CROWDTRAIN_VISIBILITY_TIMEOUT"] = "3"
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    # act: retype, drop or expire what every volunteer pulls from
    for action in (
        lambda: mallory.redis.set("train", b"x"),
        lambda: mallory.redis.delete("train"),
        lambda: mallory.redis.expire("train", 1),
        lambda: mallory.redis.rename("train", "train.16g"),
        lambda: mallory.redis.hset("train.gpu", "a", "b"),
        lambda: mallory.redis.set("unacked", b"x"),
        lambda: mallory.redis.delete("unacked"),
        lambda: mallory.redis.set("unacked_index", b"x"),
        lambda: mallory.redis.lpush("unacked_mutex", b"x"),
        lambda: mallory.redis.set("_kombu.binding.train", b"x"),
        lambda: mallory.redis.hset("ct:trusted:unacked", "tag", b"x"),  # the aggregator's own
    ):
        _refused(action)
    # assert: with the same rights, a volunteer killed holding a shard has it restored by another
    slow = {"CROWDTRAIN_BROKER_URL": cluster.url_for("bob"), "CROWDTRAIN_TEST_STEP_SECONDS": "3"}
    bob = cluster.procs.volunteer("bob", "--allow-job", SLOW, **slow)
    cluster.procs.json("init", "--run", "r", "--job", SLOW, "--local-steps", "3", "--shards", "1")
    number = cluster.post("--deadline", "600")
    cluster.wait_until(lambda: cluster.admin.hlen("unacked") == 1, "bob to hold the shard")
    cluster.procs.kill(bob)
    cluster.procs.volunteer("carol", "--allow-job", SLOW, CROWDTRAIN_BROKER_URL=cluster.url_for("carol"))
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["accepted"] == 1, record
    assert cluster.store.volunteers()["carol"].get("accepted") == 1
    refused = {entry["username"] for entry in cluster.admin.acl_log(count=1000)}
    assert refused == {"mallory"}, "an honest volunteer needed a right it was not given"


# --- 2. a full Redis ------------------------------------------------------------------------------
def _fill(mallory: redis.Redis, tag: str) -> int:
    """Write junk into every kombu key family the volunteer ACL grants, until Redis refuses; bytes written."""
    written, junk = 0, b"j" * CHUNK
    for n in range(10_000):
        kind = n % 4
        try:
            if kind == 0:
                mallory.hset("unacked", f"{tag}-{n}", junk)  # a field with no index entry
            elif kind == 1:
                mallory.rpush(f"train.junk-{tag}-{n % 50}", junk)  # a list no queue routes to
            elif kind == 2:
                mallory.sadd(f"_kombu.binding.junk-{tag}-{n % 50}", junk + str(n).encode())
            else:
                mallory.rpush(f"train{PRIORITY_SEP}junk-{tag}", junk)  # a priority list of no step
        except redis.exceptions.OutOfMemoryError:
            return written
        written += CHUNK
    raise AssertionError("Redis never filled up")


def _refuses_writes(admin: redis.Redis, mallory: redis.Redis) -> bool:
    """Set ``maxmemory`` 4 MiB under what Redis uses now; True once a write is refused.

    Never under half of MAXMEMORY: the aggregator may have swept the junk meanwhile (it watches
    Redis's memory), and a limit chased down after it would sit under the run's own data, which
    then could never be written again (or under 0, which Redis refuses). Mallory fills Redis
    again first.
    """
    if _used(admin) - 4 * 2**20 < MAXMEMORY // 2:
        admin.config_set("maxmemory", MAXMEMORY)
        _fill(mallory, "a")
    admin.config_set("maxmemory", _used(admin) - 4 * 2**20)
    try:
        admin.set("probe", b"x")
    except redis.exceptions.OutOfMemoryError:
        return True
    admin.delete("probe")
    return False


def _used(admin: redis.Redis) -> int:
    return int(admin.info("memory")["used_memory"])


def test_a_volunteer_filling_redis_is_swept_and_the_aggregator_rides_it_out(full_cluster, tmp_path):
    cluster = full_cluster
    gate = tmp_path / "gate"
    aggregator = cluster.procs.spawn(
        "aggregator", "-m", "cli.coordinator", "aggregator", "--name", "aggregator",
        CROWDTRAIN_TEST_EVAL_GATE=str(gate),
    )  # fmt: skip
    bob = cluster.procs.volunteer("bob", "--allow-job", GATED, CROWDTRAIN_BROKER_URL=cluster.url_for("bob"))
    mallory = cluster.mallory()
    cluster.procs.json("init", "--run", "r", "--job", GATED, "--local-steps", "3", "--shards", "2")
    number = cluster.post("--deadline", "600")
    # the aggregator is merging the round (held in its evaluation) when Redis fills up
    cluster.wait_until(lambda: Path(str(gate) + ".waiting").exists(), "the merge to reach its evaluation")
    cluster.admin.config_set("maxmemory", MAXMEMORY)
    written = _fill(mallory.redis, "a")
    assert written > MAXMEMORY // 2
    # full means full: no write of anyone's fits, whatever Redis frees meanwhile (its buffers, or
    # the aggregator sweeping the junk as it lands): the limit goes under the use until it holds
    cluster.wait_until(lambda: _refuses_writes(cluster.admin, mallory.redis), "Redis to refuse every write")
    gate.touch()
    # assert: the aggregator reports the full Redis, lives, sweeps the junk, and the round ends
    record = cluster.wait_ended(number)
    assert aggregator.poll() is None and bob.poll() is None, cluster.procs.log_tail()
    assert record["status"] == "done" or record.get("reason"), record
    cluster.wait_until(lambda: _junk(cluster.admin) == [], "the junk to be swept")
    logs = cluster.procs.log_tail(500_000)
    assert "Unrecoverable error" not in logs, logs[-4000:]
    assert "out of memory" in logs.lower() or "OOM" in logs, logs[-4000:]
    # ... and the run goes on: the next round completes
    again = cluster.wait_ended(cluster.post("--deadline", "600"))
    assert again["status"] == "done", again
    assert aggregator.poll() is None and bob.poll() is None, cluster.procs.log_tail()


def _junk(admin: redis.Redis) -> list[bytes]:
    """What of mallory's junk is left in Redis."""
    found = [k for k in admin.scan_iter(match="train.junk-*")]
    found += [k for k in admin.scan_iter(match="_kombu.binding.junk-*")]
    found += [k for k in admin.scan_iter(match="train\x06\x16junk-*")]
    found += [f for f in admin.hkeys("unacked") if f.startswith(b"a-")]
    return found


# --- 3. the announcement list, flooded -------------------------------------------------------------
def test_an_announcement_flood_writes_a_bounded_number_of_log_lines(queue_cluster):
    cluster = queue_cluster
    aggregator = cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    announce = keys.announcements()
    before = _lines(cluster)
    # act: 20,000 bogus entries of every kind: malformed, unknown rounds, a bad token, no upload
    for start in range(0, 20_000, 1000):
        entries = []
        for i in range(start, start + 1000):
            entries += [
                b"\xff junk %d" % i,
                keys.upload("mallory", "r", 900 + i, 0, "ab" * 8).encode(),
                keys.upload("mallory", "r", number, i, "cd" * 8).encode(),
                keys.upload("mallory", "r", number, 0, f"{i:016x}").encode(),
            ]
        mallory.redis.rpush(announce, *entries)
    cluster.wait_until(lambda: cluster.admin.llen(announce) == 0, "the flood to be drained")
    # the run goes on
    cluster.volunteer("bob")
    assert cluster.wait_ended(number)["status"] == "done"
    assert aggregator.poll() is None
    lines = _lines(cluster) - before
    assert lines < 300, f"{lines} log lines for 80,000 bogus announcements"
    # ... and what was held back is counted, a line per kind and period
    cluster.wait_until(lambda: "more like this in the last" in _log(cluster), "the count of the rest")


def _log(cluster: Cluster) -> str:
    path = cluster.procs.logs / "aggregator.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _lines(cluster: Cluster) -> int:
    return len(_log(cluster).splitlines())
