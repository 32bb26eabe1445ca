"""Attacks a stranger's volunteer could try, and the defences that stop them (docs/SECURITY.md)."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import pytest
import redis
import torch
from kombu import Connection, Exchange, Queue

from broker import blobs, embedded, keys
from coordinator.rounds.intake import MAX_REOFFERS
from coordinator.rounds.leases import OFFER_SECONDS
from coordinator.runs import credentials
from coordinator.store import Store
from serialization import dumps, dumps_stream
from tests.conftest import Processes, wait_until
from volunteer.store import VolunteerStore

pytestmark = pytest.mark.attack

TINY = "tests.fixtures.jobs_tiny:make_job"
MARKER_JOB = "tests.fixtures.jobs_marker:make_job"
ROUND_FLAGS = ["--local-steps", "3", "--shards", "2", "--deadline", "60"]


class Exploit:
    """Unpickling this touches a file: proof that someone ran pickle.loads on it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# --- 1. never unpickle -------------------------------------------------------------
def test_pickled_messages_on_both_queues_are_refused_unread_and_the_next_round_completes(processes, tmp_path):
    # arrange
    aggregator = processes.aggregator()
    volunteer = processes.volunteer("alice", "--allow-job", TINY)
    processes.json("init", "--run", "demo", "--job", TINY, *ROUND_FLAGS)
    pwned = tmp_path / "pwned"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Exploit(control)))  # the payload does what it says...
    assert control.exists()
    # act: a task-shaped message in pickle on each queue, as a volunteer of a broker without
    # ACL users could push (with its own user, one may push to `train` only)
    with Connection(processes.broker) as connection:
        producer = connection.Producer()
        for queue, task in (("train", "train_shard"), ("aggregate", "aggregate_round")):
            task_id = str(uuid.uuid4())
            producer.publish(
                Exploit(pwned),
                serializer="pickle",
                exchange=Exchange(queue, "direct"),
                routing_key=queue,
                declare=[Queue(queue, Exchange(queue, "direct"), queue)],
                headers={
                    "lang": "py",
                    "task": task,
                    "id": task_id,
                    "root_id": task_id,
                    "argsrepr": "()",
                    "kwargsrepr": "{}",
                    "origin": "mallory@evil",
                },
            )
    document = processes.json("run", "--run", "demo", "--rounds", "1")
    # settled: each queue's consumer has logged refusing its pickle (a worker that unpickled one
    # would have touched the file before any line of it)
    wait_until(
        lambda: all(_refused_content(processes.log(name)) for name in ("alice", "aggregator")),
        "alice and the aggregator to refuse the pickled messages",
        processes=processes,
    )
    # assert
    assert not pwned.exists(), "a worker unpickled a message"
    assert aggregator.poll() is None and volunteer.poll() is None, processes.log_tail()
    assert document["rounds"][0]["status"] == "done", processes.log_tail()
    assert document["rounds"][0]["accepted"] == 2
    store = Store(redis.Redis.from_url(processes.broker))
    assert store.queue_depths() == {"train": 0, "aggregate": 0}
    logs = processes.log_tail(100_000)
    assert logs.count("ContentDisallowed") + logs.count("content type") >= 2, logs[-3000:]


def _refused_content(log: str) -> bool:
    return "ContentDisallowed" in log or "content type" in log


# --- 2. least-privilege volunteer credentials --------------------------------------
def test_a_volunteer_user_trains_a_round_but_cannot_touch_what_it_does_not_own(admin_processes):
    # arrange
    procs, admin = admin_processes
    alice = procs.json("volunteer-credentials", "alice")
    bob = credentials.command(admin, procs.broker, "bob", quiet=True)
    assert alice["url"].startswith("redis://alice:") and alice["url"] != bob["url"]
    procs.aggregator()  # trusted: the admin URL
    volunteer = procs.volunteer("alice", "--allow-job", TINY, CROWDTRAIN_BROKER_URL=alice["url"])
    procs.json("init", "--run", "demo", "--job", TINY, *ROUND_FLAGS)
    # act
    document = procs.json("run", "--run", "demo", "--rounds", "1")
    # assert: alice, with only her own rights, trained the whole round
    assert document["rounds"][0]["status"] == "done", procs.log_tail()
    assert document["rounds"][0]["accepted"] == 2
    assert volunteer.poll() is None
    assert {n: v.get("accepted") for n, v in Store(admin).volunteers().items()} == {"alice": 2}
    assert admin.acl_log() == [], "the volunteer needed a right it was not given"

    mallory = redis.Redis.from_url(alice["url"])  # alice turned malicious
    bob_upload = keys.upload("bob", "demo", 1, 0, "b" * 32)
    alice_upload = keys.upload("alice", "demo", 1, 0, "a" * 32)
    admin.set(bob_upload, b"bob's delta")
    round_key = "ct:run:demo:round:1"
    attacks = {
        "overwrite a model version": lambda: mallory.set("ct:run:demo:model:1", b"evil"),
        "bump the version": lambda: mallory.set("ct:run:demo:version", 99),
        "rewrite the run config": lambda: mallory.set("ct:run:demo:config", b"evil"),
        "reopen a round": lambda: mallory.hset(round_key, "status", "open"),
        "accept a shard": lambda: mallory.hset(round_key + ":accepted", 0, "ct:upload:alice:x"),
        "overwrite bob's upload": lambda: mallory.set(bob_upload, b"evil"),
        "rename its upload over bob's": lambda: mallory.rename(alice_upload, bob_upload),
        "rename bob's upload away": lambda: mallory.rename(bob_upload, alice_upload),
        "delete bob's upload": lambda: mallory.delete(bob_upload),
        "read bob's upload": lambda: mallory.get(bob_upload),
        "forge bob's credit": lambda: mallory.hset("ct:volunteer:bob", "accepted", 1000),
        "read the aggregate queue": lambda: mallory.rpop("aggregate"),
        "FLUSHALL": lambda: mallory.flushall(),
        "CONFIG": lambda: mallory.config_get("*"),
        "CONFIG SET dir": lambda: mallory.config_set("dir", "/tmp"),
        "KEYS": lambda: mallory.keys("*"),
        "SCAN": lambda: mallory.scan(),
        "DEBUG": lambda: mallory.execute_command("DEBUG", "SLEEP", "0"),
        "EVAL of its own Lua": lambda: mallory.eval("return 1", 0),
        "SCRIPT LOAD": lambda: mallory.script_load("return 1"),
        "ACL SETUSER": lambda: mallory.execute_command("ACL", "SETUSER", "alice", "~*", "+@all"),
        "SHUTDOWN": lambda: mallory.shutdown(),
    }
    for attack, call in attacks.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
            pytest.fail(f"alice could {attack}")
    # a script the admin loaded runs under the caller's ACL: EVALSHA cannot write either
    sha = admin.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
    with pytest.raises(redis.ResponseError, match=r"no permissions|can't run|NOPERM"):
        mallory.evalsha(sha, 1, "ct:run:demo:version", 99)
    assert admin.get(bob_upload) == b"bob's delta"
    assert admin.hget(round_key, "status") == b"done"
    assert int(admin.get("ct:run:demo:version")) == 1
    # what alice may do: read the run, write her own upload
    assert mallory.get("ct:run:demo:version") == b"1"
    mallory.set(keys.upload("alice", "demo", 9, 0, "a" * 32), b"mine", ex=60)
    # ... and stream an upload larger than a chunk (written to its partial key, renamed into place)
    admin.acl_log_reset()
    weights = {"w": torch.randn(3 * blobs.MIB // 4)}  # 3 MiB and a header: four 1 MiB chunks
    os.environ[blobs.CHUNK_ENV] = "1"
    try:
        key = VolunteerStore(mallory, "alice").put_upload("demo", 9, 1, "d" * 32, dumps_stream(weights))
    finally:
        del os.environ[blobs.CHUNK_ENV]
    assert bytes(blobs.read(admin, key) or b"") == dumps(weights) and admin.llen(key) == 5
    assert admin.acl_log() == [], "streaming an upload needed a right the volunteer was not given"

    # revoke: alice's user is gone and her password no longer opens the broker
    result = procs.cli("volunteer-credentials", "alice", "--revoke")
    assert result.returncode == 0, result.stderr
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(alice["url"]).ping()


def test_volunteer_credentials_on_redis_6_fail_with_one_line_naming_redis_7(processes):
    result = processes.cli("volunteer-credentials", "alice")
    assert result.returncode == 2
    assert "Redis 7" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_volunteer_urls_keep_scheme_database_and_query_and_take_a_public_host():
    url = credentials.volunteer_url(
        "rediss://:admin@10.0.0.5:6380/2?ssl_cert_reqs=required", "alice", "p/w@", host="broker.example.org"
    )
    assert url == "rediss://alice:p%2Fw%40@broker.example.org:6380/2?ssl_cert_reqs=required"
    assert (
        credentials.volunteer_url("redis://127.0.0.1:6379/0", "bob", "pw", host="h:7000")
        == "redis://bob:pw@h:7000/0"
    )
    with pytest.raises(credentials.CredentialsError):
        credentials.check_name("default")
    with pytest.raises(credentials.CredentialsError):
        credentials.check_name("alice ~* +@all")  # no ACL rule injection through the name
    for host in ("evil/host", "a b", "h:99999", "h:port", "user@h"):  # it goes into a URL
        with pytest.raises(credentials.CredentialsError, match="--host"):
            credentials.volunteer_url("redis://127.0.0.1:6379/0", "bob", "pw", host=host)


def test_volunteer_rules_grant_no_dangerous_command_and_only_its_own_writes():
    rules = credentials.volunteer_rules("alice")
    assert rules[:5] == ["reset", "on", "resetkeys", "resetchannels", "-@all"]
    granted = {r[1:] for r in rules if r.startswith("+")}
    assert not granted & {
        "flushall",
        "flushdb",
        "config",
        "keys",
        "scan",
        "debug",
        "eval",
        "script|load",
        "acl",
        "shutdown",
        "module",
        "bgsave",
        "save",
        "migrate",
        "replicaof",
        "slaveof",
        "monitor",
        "client|kill",
        "function",
        "fcall",
    }
    writable = [r for r in rules if r.startswith("~") or r.startswith("%W~")]
    assert all("ct:run" not in r for r in writable)
    assert "~ct:upload:alice:*" in rules and not any("upload:*" in r for r in rules)
    # records and results are the trusted side's (it may read its own record); the control channel
    # is listen-only
    assert [r for r in rules if "ct:volunteer" in r] == ["%R~ct:volunteer:alice"]
    assert not any("celery-task-meta" in r for r in rules)
    channels = [r for r in rules if r.startswith("&")]
    assert channels == ["&/0.celeryev/*"]
    assert rules[-2] == "(+subscribe +psubscribe +unsubscribe +punsubscribe &/0.celery.pidbox)"
    # the trusted queue is out of reach; the announcement and lease request lists (its own) may be
    # appended to and nothing else; it reads the answers to its own lease requests, no one else's
    assert not any("aggregate" in r for r in rules)
    assert rules[-1] == "(+rpush ~ct:announce ~ct:asks ~ct:ask:alice)" and "~ct:announce" not in rules
    assert "~ct:grant:alice:*" in rules and not any("ct:lease" in r or "ct:kept" in r for r in rules)


# --- 2b. the embedded Redis never listens beyond loopback without a password -------
@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "localhost", "127.0.0.1 -::1"])
def test_embedded_redis_binds_loopback_without_a_password(bind):
    embedded.check_bind(bind, None)


@pytest.mark.parametrize("bind", ["0.0.0.0", "*", "192.168.1.4", "127.0.0.1 10.0.0.2", "myhost"])
def test_embedded_redis_refuses_a_wider_bind_without_a_long_password(bind):
    with pytest.raises(embedded.EmbeddedRedisError, match="CROWDTRAIN_EMBEDDED_PASSWORD"):
        embedded.check_bind(bind, None)
    with pytest.raises(embedded.EmbeddedRedisError, match="at least"):
        embedded.check_bind(bind, "short")
    embedded.check_bind(bind, "x" * embedded.MIN_PASSWORD_LENGTH)


def test_embedded_redis_on_all_interfaces_demands_its_password(tmp_path):
    # arrange
    env = {embedded.BIND_ENV: "0.0.0.0", embedded.PASSWORD_ENV: "a-long-password-for-tests"}
    with pytest.raises(embedded.EmbeddedRedisError):
        embedded.ensure_running(tmp_path / "refused", env={embedded.BIND_ENV: "0.0.0.0"})
    # act
    server = embedded.ensure_running(tmp_path, env=env)
    try:
        # assert
        assert server.url.startswith("redis://:a-long-password-for-tests@127.0.0.1:")
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("ct:run:x:version", 1)
        state = tmp_path / "redis" / embedded.STATE_FILE
        assert state.stat().st_mode & 0o077 == 0  # the URL in it holds the password
    finally:
        embedded.stop(server)


def test_the_cli_refuses_an_open_embedded_bind_with_one_line(tmp_path):
    processes = Processes(tmp_path / "home", "")
    result = processes.cli("status", CROWDTRAIN_BROKER_URL="", CROWDTRAIN_EMBEDDED_BIND="0.0.0.0")
    assert result.returncode == 2
    assert "without a password" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- 4. the job allow-list -----------------------------------------------------------
def test_a_volunteer_refuses_a_job_off_its_allow_list_without_importing_it(processes, tmp_path, monkeypatch):
    # arrange: the trusted side imports the job (its marker proves the fixture works);
    # the volunteer, with its own marker path, must never import it
    trusted_marker = tmp_path / "trusted-imported"
    volunteer_marker = tmp_path / "volunteer-imported"
    monkeypatch.setenv("CROWDTRAIN_TEST_MARKER", str(trusted_marker))  # every other process
    processes.aggregator()
    volunteer = processes.volunteer("alice", CROWDTRAIN_TEST_MARKER=str(volunteer_marker))
    # the deadline ends the round before the shards' routine offer (OFFER_SECONDS after posting)
    # could add refusals of its own. It runs from the post: alice's start-up (seconds on a loaded
    # machine) must not eat it, so she is online first; the six refusals then take well under 1 s.
    deadline = str(OFFER_SECONDS - 1)
    processes.json("init", "--run", "marked", "--job", MARKER_JOB, "--shards", "2", "--deadline", deadline)
    processes.wait_online("aggregator", "alice")
    # act
    document = processes.json("run", "--run", "marked", "--rounds", "1")
    # assert
    round_ = document["rounds"][0]
    assert trusted_marker.exists()
    assert not volunteer_marker.exists(), "the volunteer imported a job off its allow-list"
    assert volunteer.poll() is None
    assert round_["status"] == "failed" and round_["accepted"] == 0
    reasons = [r["reason"] for r in round_["rejections"]]
    # each shard is offered again after a failure, MAX_REOFFERS times, and refused each time
    assert len(reasons) == 2 * (1 + MAX_REOFFERS), reasons
    assert all("not on its --allow-job list" in r for r in reasons), reasons
    assert json.dumps(round_)  # the reasons are plain JSON for the report
