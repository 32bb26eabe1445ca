"""The run goes on when the Redis primary dies: Sentinel promotes the replica, everyone follows.

Real servers: a Redis 7 primary, its replica and three sentinels (tests.fixtures.servers);
real processes: the aggregator, a volunteer with least-privilege credentials, ``coordinator run``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.client import redis_client
from broker.settings import Settings
from coordinator.store import Store
from coordinator.views.documents import round_record
from tests.conftest import Processes, wait_until
from tests.fixtures.servers import SentinelCluster

SLOW_JOB = "tests.fixtures.jobs_slow:make_job"
ROUNDS = 4


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path / "redis")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def failover_processes(tmp_path: Path, sentinel_cluster: SentinelCluster) -> Iterator[Processes]:
    procs = Processes(tmp_path / "home", sentinel_cluster.url())
    procs.extra_env["CROWDTRAIN_VISIBILITY_TIMEOUT"] = "6"
    yield procs
    procs.stop_all()


def quietly(predicate):
    """``predicate`` read through a failover: a Redis error while the primary changes is "not yet"."""

    def check():
        try:
            return predicate()
        except redis.RedisError:
            return None

    return check


def test_the_primary_dies_mid_round_and_the_run_goes_on_with_a_least_privilege_volunteer(
    sentinel_cluster, failover_processes
):
    # arrange: alice's user on both data nodes, a URL that names the sentinels
    procs, cluster = failover_processes, sentinel_cluster
    alice = procs.json("volunteer-credentials", "alice")
    url = alice["url"]
    assert url.startswith("sentinel://alice:") and url.endswith(f"?master_name={cluster.MASTER}")
    assert all(f"127.0.0.1:{port}/0" in url for port in cluster.sentinel_ports)
    for node in cluster.nodes:
        assert node.client().acl_getuser("alice") is not None, f"no volunteer user on {node.port}"
    store = Store(redis_client(Settings(broker_url=cluster.url())))
    procs.aggregator()
    volunteer = procs.volunteer(
        "alice", "--allow-job", SLOW_JOB, CROWDTRAIN_BROKER_URL=url, CROWDTRAIN_TEST_STEP_SECONDS="0.3"
    )
    procs.json("init", "--run", "r", "--job", SLOW_JOB, "--local-steps", "3", "--shards", "2")
    run = subprocess.Popen(
        [sys.executable, "-m", "cli.coordinator", "run", "--run", "r", "--rounds", str(ROUNDS), "--json"],
        env=procs.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=procs.home,
    )
    procs.started.append(run)
    # act: SIGKILL the primary while round 2 is open
    wait_until(
        quietly(lambda: store.version("r") >= 1 and store.rounds.count("r") >= 2), "round 2 to open", 120
    )
    trained_before = int(store.volunteers()["alice"].get("shards_done", 0))
    dead = cluster.kill_primary()
    killed_at = time.monotonic()
    survivor = cluster.wait_failover(dead)
    out, err = run.communicate(timeout=180)
    # assert: the run finished on the promoted replica, one new version a round
    assert run.returncode == 0, err[-2000:] + procs.log_tail()
    print(f"\nprimary killed: run finished {time.monotonic() - killed_at:.1f}s later")
    document = json.loads(out)
    assert [r["model_version"] for r in document["rounds"]] == list(range(1, ROUNDS + 1))
    history = [round_record(store, "r", n) for n in range(1, store.rounds.count("r") + 1)]
    assert [r["status"] for r in history] == ["done"] * ROUNDS
    assert store.version("r") == ROUNDS
    assert store.redis.connection_pool.get_master_address()[1] == survivor.port
    # no accepted delta counted twice: alice's credit is the rounds' accepted shards, each at most once
    assert all(r["accepted"] <= r["shards"] for r in history)
    record = store.volunteers()["alice"]
    assert int(record["accepted"]) == sum(r["accepted"] for r in history)
    # the same volunteer process, never restarted, trained on the promoted replica
    assert volunteer.poll() is None, procs.log_tail()
    assert int(record["shards_done"]) > trained_before
    assert survivor.client().acl_log() == [], "alice needed a right she was not given"
    # the operator's view works through the sentinels too: the run, and alice answering a ping
    status = procs.json("status")
    assert status["runs"][0]["model_version"] == ROUNDS
    # alice's answer to the status's 1 s broadcast can miss it on a loaded machine: ask again
    online = lambda: {v["name"]: v["online"] for v in procs.json("status")["volunteers"]}.get("alice")  # noqa: E731
    wait_until(online, "status to show alice online through the sentinels", 30, procs)
    # revoking reaches every live node
    assert procs.json("volunteer-credentials", "alice", "--revoke")["revoked"] is True
    assert survivor.client().acl_getuser("alice") is None
