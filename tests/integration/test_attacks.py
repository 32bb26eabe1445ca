"""Every door one volunteer could use to stop, poison or stall a run, tried against the running system.

Each test starts a Redis 7 whose admin user has a password, a real aggregator
process and real volunteer processes on least-privilege ACL users (``coordinator
volunteer-credentials``), then attacks with nothing but a volunteer's credentials
(``tests.fixtures.attacker.Mallory``). ``pytest -m attack`` runs them all; the
table in docs/SECURITY.md names the test of each door.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgpack
import pytest
import redis
import torch
from safetensors.torch import load_file

from broker import blobs, keys
from coordinator.rounds.janitor import sweep_uploads
from coordinator.runs.context import RunContexts
from coordinator.store import Store
from coordinator.views.documents import round_record
from serialization import dumps, loads
from tests.conftest import ROOT, Processes, wait_until
from tests.fixtures.attacker import Mallory, delta_blob
from tests.fixtures.jobs_tiny import TinyJob

pytestmark = pytest.mark.attack

TINY = "tests.fixtures.jobs_tiny:make_job"
WAIT = 120.0
T = TypeVar("T")


class Cluster:
    """A run on a password-protected Redis 7: the admin's view and helpers to act as volunteers."""

    def __init__(self, procs: Processes, admin: redis.Redis) -> None:
        self.procs = procs
        self.admin = admin
        self.store = Store(admin)

    def url_for(self, name: str) -> str:
        """A volunteer's own broker URL, made by the operator."""
        return str(self.procs.json("volunteer-credentials", name)["url"])

    def volunteer(self, name: str, *extra: str, **env: str) -> subprocess.Popen:
        return self.procs.volunteer(
            name, "--allow-job", TINY, *extra, CROWDTRAIN_BROKER_URL=self.url_for(name), **env
        )

    def mallory(self, name: str = "mallory") -> Mallory:
        return Mallory(self.url_for(name), name)

    def init(self, *flags: str) -> None:
        # crafted uploads below are float32 (delta_blob): the run must expect that codec
        self.procs.json(
            "init", "--run", "r", "--job", TINY, "--local-steps", "3", "--compression", "none", *flags
        )

    def post(self, *flags: str) -> int:
        return int(self.procs.json("post-round", "--run", "r", *flags)["round"])

    def round(self, number: int) -> dict[str, Any]:
        return self.store.rounds.info("r", number) or {}

    def wait_until(self, condition: Callable[[], T], what: str, timeout: float = WAIT) -> T:
        """``tests.conftest.wait_until`` with this cluster's logs."""
        return wait_until(condition, what, timeout, self.procs)

    def wait_ended(self, number: int) -> dict[str, Any]:
        self.wait_until(
            lambda: self.round(number).get("status") in ("done", "failed"), f"round {number} to end"
        )
        return round_record(self.store, "r", number)

    def wait_online(self, *names: str) -> None:
        self.procs.wait_online(*names, timeout=WAIT)

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        blob = self.store.model_blob("r", version)
        assert blob is not None
        return loads(blob)[0]


@pytest.fixture
def cluster(admin_processes: tuple[Processes, redis.Redis]) -> Iterator[Cluster]:
    procs, admin = admin_processes
    yield Cluster(procs, admin)


def _refused(action: Callable[[], object]) -> str:
    """Run an action that the ACL must refuse; return the refusal's text."""
    with pytest.raises(Exception) as refusal:  # redis-py or kombu, depending on the path
        action()
    assert "NOPERM" in str(refusal.value) or "permission" in str(refusal.value).lower(), refusal.value
    return str(refusal.value)


def _tiny_delta(value: float, noise: float = 0.0, bump: int | None = None) -> dict[str, torch.Tensor]:
    """A delta of the tiny job's model (nn.Linear(4, 1)), every entry ``value`` (+ noise).

    ``bump`` raises one weight by 30%: voices of different bumps point different ways
    (cosine 0.98), as honest ones do, where equal ones would be refused as copies.
    """
    weight = torch.full((1, 4), value) + noise * torch.randn(1, 4)
    if bump is not None:
        weight[0, bump] += 0.3 * value
    bias = torch.full((1,), value) + noise * torch.randn(1)
    return {"weight": weight, "bias": bias}


# --- 1. remote control ------------------------------------------------------------------------
def test_a_volunteer_can_command_no_worker_while_the_operator_still_can(cluster):
    aggregator = cluster.procs.aggregator()
    bob = cluster.volunteer("bob")
    mallory = cluster.mallory()
    cluster.init("--shards", "2")
    cluster.wait_online("aggregator", "bob")
    # act: every command of the reproduced attack, with mallory's credentials
    _refused(lambda: mallory.app.control.broadcast("shutdown"))
    _refused(lambda: mallory.app.control.cancel_consumer("aggregate"))
    _refused(lambda: mallory.redis.publish("/0.celery.pidbox", "{}"))
    # assert: nobody obeyed, the run goes on, the operator's tools work
    record = cluster.wait_ended(cluster.post())
    assert record["status"] == "done", cluster.procs.log_tail()
    assert aggregator.poll() is None and bob.poll() is None
    env = {**cluster.procs.env(), "CROWDTRAIN_BROKER_URL": cluster.procs.broker}

    def operator_ping() -> subprocess.CompletedProcess | None:
        """The operator's ``celery inspect ping``, once both workers answered it (a ping waits out its
        whole --timeout: short ones, asked again, end as soon as both are in)."""
        ping = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks", "inspect", "ping", "--timeout", "1"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        answered = ping.returncode == 0 and "bob@" in ping.stdout and "aggregator@" in ping.stdout
        return ping if answered else None

    cluster.wait_until(operator_ping, "the operator's celery inspect ping to reach bob and the aggregator")


# --- 2. poison messages -----------------------------------------------------------------------
def test_malformed_messages_on_both_queues_are_dropped_and_no_worker_dies(cluster):
    aggregator = cluster.procs.aggregator()
    bob = cluster.volunteer("bob")
    mallory = cluster.mallory()
    operator = Mallory(cluster.procs.broker, "operator")  # the admin URL: only it reaches `aggregate`
    cluster.init("--shards", "2")
    cluster.wait_online("aggregator", "bob")
    map_body = msgpack.packb({"run": "r", "round": 1, "shard": 0})
    _refused(lambda: mallory.push_raw("aggregate", b"\xff\xfe not json"))  # the trusted queue: no entry
    _refused(lambda: mallory.push_envelope("aggregate", "aggregate_round", map_body))
    for sender, queue, task in (
        (mallory, "train", "train_shard"),
        (operator, "aggregate", "aggregate_round"),
    ):
        for junk in (b"\xff\xfe not json", b"", b"[1, 2, 3]", b'{"no": "properties"}'):
            sender.push_raw(queue, junk)
        sender.push_envelope(queue, task, map_body)
        sender.push_envelope(queue, task, msgpack.packb([1, 2]))
    cluster.wait_until(
        lambda: cluster.store.queue_depths() == {"train": 0, "aggregate": 0}, "the junk to be read"
    )
    assert aggregator.poll() is None and bob.poll() is None, cluster.procs.log_tail()
    assert cluster.wait_ended(cluster.post())["status"] == "done", cluster.procs.log_tail()
    # the junk is gone for good: restarted workers do not die on it again
    cluster.procs.kill(aggregator, signal.SIGTERM)  # a warm shutdown, as an operator restarts it
    cluster.procs.kill(bob, signal.SIGTERM)
    aggregator, bob = cluster.procs.aggregator(), cluster.volunteer("bob")
    assert cluster.wait_ended(cluster.post())["status"] == "done", cluster.procs.log_tail()
    assert aggregator.poll() is None and bob.poll() is None
    assert cluster.procs.log_tail(200_000).count("dropped a malformed") >= 6


# --- 3. swap after validation -----------------------------------------------------------------
def test_the_bytes_merged_are_exactly_the_bytes_validated(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    good = [_tiny_delta(0.01 * (i + 1), bump=i) for i in range(2)]
    token = mallory.deliver("r", number, 0, delta_blob(good[0], "r", number, 0, 0))
    cluster.wait_until(lambda: cluster.round(number).get("accepted") == 1, "shard 0 to be accepted")
    # act: rewrite the validated upload with NaN and a samples claim of 2e12
    poison = delta_blob(_tiny_delta(math.nan), "r", number, 0, 0, samples=2 * 10**12)
    mallory.upload("r", number, 0, poison)  # a new key under its prefix: allowed, and ignored
    blobs.write(mallory.redis, keys.upload("mallory", "r", number, 0, token), poison)
    copy = keys.accepted_upload("r", number, "mallory", 0, token)
    _refused(lambda: mallory.redis.set(copy, poison))
    _refused(lambda: mallory.redis.hset(keys.round_accepted("r", number), 0, "x"))
    mallory.deliver("r", number, 1, delta_blob(good[1], "r", number, 1, 0))
    record = cluster.wait_ended(number)
    # assert: version 1 = version 0 + the mean of the two deltas that were validated
    assert record["status"] == "done", record
    before, after = cluster.weights(0), cluster.weights(1)
    for name in before:
        expected = before[name] + (good[0][name] + good[1][name]) / 2
        assert torch.allclose(after[name], expected, atol=1e-6), name
    assert math.isfinite(record["eval_loss"])


# --- 4. forged records ------------------------------------------------------------------------
def test_credit_and_the_volunteer_list_are_written_by_the_trusted_side_only(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    forgeries = {
        "credit": lambda: mallory.redis.hset(keys.volunteer("mallory"), "accepted", 1_000_000),
        "device": lambda: mallory.redis.hset(keys.volunteer("mallory"), "device", "cuda"),
        "remove bob": lambda: mallory.redis.srem(keys.volunteers(), "bob"),
        "add a fake": lambda: mallory.redis.sadd(keys.volunteers(), "fake"),
        "read results": lambda: mallory.redis.get("celery-task-meta-x"),
        "write results": lambda: mallory.redis.set("celery-task-meta-x", b"{}"),
    }
    for action in forgeries.values():
        _refused(action)
    number = cluster.post()
    mallory.deliver("r", number, 0, dumps({}, {"failure": "I failed"}))  # a failure earns nothing
    mallory.deliver("r", number, 1, b"junk that is not the wire format")
    cluster.wait_until(lambda: cluster.round(number).get("rejected") == 2, "both to be rejected")
    bob = cluster.volunteer("bob")
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and bob.poll() is None, cluster.procs.log_tail()
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert people["mallory"]["accepted"] == 0 and people["mallory"]["samples"] == 0
    assert people["mallory"]["shards_done"] == 0 and people["mallory"]["rejected"] == 2
    assert people["bob"]["accepted"] >= 1 and people["bob"]["device"] == "cpu"
    # late junk, under no lease (the round is closed), is deleted unread and counts nothing
    bound = RunContexts(cluster.store)["r"].upload_bound
    uplink = int(cluster.round(number)["uplink_bytes"])
    mallory.deliver("r", number, 0, b"\0" * (bound + 5_000_000))
    cluster.wait_until(
        lambda: not list(cluster.admin.scan_iter(match=keys.upload_pattern("mallory"))),
        "the late upload to go",
    )
    assert int(cluster.round(number)["uplink_bytes"]) == uplink


# --- 5. one identity takes a round ------------------------------------------------------------
def test_a_volunteer_answering_many_shards_has_one_voice(cluster):
    cluster.procs.aggregator()
    honest = [cluster.mallory(name) for name in ("ann", "ben", "cid")]
    mallory = cluster.mallory()
    cluster.init("--shards", "6", "--strategy", "median", "--deadline", "600", "--verify", "none")
    number = cluster.post()
    for shard, person in enumerate(honest):
        person.deliver("r", number, shard, delta_blob(_tiny_delta(0.1, bump=shard), "r", number, shard, 0))
    for shard in (3, 4, 5):  # the opposite push, at an ordinary norm, three times
        mallory.deliver("r", number, shard, delta_blob(_tiny_delta(-0.1, 1e-3), "r", number, shard, 0))
    record = cluster.wait_ended(number)
    assert record["status"] == "done", record
    moved = {name: (cluster.weights(1)[name] - cluster.weights(0)[name]) for name in ("weight", "bias")}
    # 6 equal votes would put the median at 0; one voice each (3 honest, 1 mallory) keeps it near +0.1
    assert all(float(t.min()) > 0.09 for t in moved.values()), moved


def test_copied_bytes_count_once_and_a_lone_wild_delta_is_screened_by_the_model_scale(cluster):
    cluster.procs.aggregator()
    ann, mallory = cluster.mallory("ann"), cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    blob = delta_blob(_tiny_delta(0.05), "r", number, 0, 0)
    ann.deliver("r", number, 0, blob)
    cluster.wait_until(lambda: cluster.round(number).get("accepted") == 1, "ann's shard")
    mallory.deliver("r", number, 1, blob)  # the very same bytes
    cluster.wait_until(lambda: cluster.round(number).get("rejected") == 1, "the copy to be refused")
    mallory.deliver("r", number, 1, delta_blob(_tiny_delta(1e4), "r", number, 1, 0))
    record = cluster.wait_ended(number)
    reasons = {x["reason"] for x in record["rejections"] if x["volunteer"] == "mallory"}
    assert any("identical" in r for r in reasons), reasons
    assert any("model's norm" in r for r in reasons), reasons
    assert record["status"] == "done" and record["accepted"] == 1


# --- 6. resource exhaustion -------------------------------------------------------------------
def test_uploads_are_bounded_before_download_and_by_count_and_ttl(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    bound = RunContexts(cluster.store)["r"].upload_bound
    mallory.deliver("r", number, 0, b"\0" * (bound + 1))
    mallory.deliver("r", number, 1, dumps(_tiny_delta(0.1), {"samples": 8, "base_version": 0}, "fp16"))
    cluster.wait_until(lambda: cluster.round(number).get("rejected") == 2, "both to be refused")
    reasons = {x["shard"]: x["reason"] for x in round_record(cluster.store, "r", number)["rejections"]}
    assert "exceeds the bound" in reasons[0] and "encoded with fp16" in reasons[1], reasons
    # uploads never announced: no TTL, too many, for no run
    for shard in range(keys.MAX_OUTSTANDING_UPLOADS + 8):
        mallory.upload("r", number, shard % 2, b"x" * 100)
    mallory.redis.set(keys.upload("mallory", "ghost", 1, 0, "ab" * 16), b"x")
    sweep_uploads(cluster.store, RunContexts(cluster.store))
    left = [k.decode() for k in cluster.admin.scan_iter(match=keys.upload_pattern("mallory"))]
    assert len(left) == keys.MAX_OUTSTANDING_UPLOADS
    assert all(0 < cluster.admin.ttl(k) <= keys.UPLOAD_TTL for k in left)
    assert not any(":ghost:" in k for k in left)


def test_a_lying_or_malformed_chunk_list_is_refused_before_its_chunks_are_read(cluster):
    """An upload is a chunk list (broker.blobs) whose header is only the volunteer's word."""
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "4", "--deadline", "600")
    number = cluster.post()
    bound = RunContexts(cluster.store)["r"].upload_bound
    good = dumps(_tiny_delta(0.1), {"samples": 8, "base_version": 0})
    header = blobs.HEADER.pack(blobs.MAGIC, len(good))
    forged = {
        0: [blobs.HEADER.pack(blobs.MAGIC, 10), b"z" * (bound + (1 << 20))],  # claims 10 bytes
        1: [header, good + b"extra"],  # more bytes than the header says
        2: [header, good[: len(good) // 2]],  # fewer
    }
    for shard, chunks in forged.items():
        token = mallory.lease("r", number, shard)["token"]
        mallory.redis.rpush(keys.upload("mallory", "r", number, shard, token), *chunks)
        mallory.announce("r", number, shard, token)
    token = mallory.lease("r", number, 3)["token"]
    mallory.redis.set(keys.upload("mallory", "r", number, 3, token), good)  # no chunk list at all
    mallory.announce("r", number, 3, token)
    cluster.wait_until(lambda: cluster.round(number).get("rejected") == 4, "all four to be refused")
    reasons = {x["shard"]: x["reason"] for x in round_record(cluster.store, "r", number)["rejections"]}
    assert "exceeds the bound" in reasons[0], reasons
    assert all("malformed upload" in reasons[shard] for shard in (1, 2, 3)), reasons
    assert cluster.round(number).get("accepted", 0) == 0
    left = list(cluster.admin.scan_iter(match=keys.upload_pattern("mallory")))
    assert left == [], "nothing refused is kept"


def test_old_versions_leave_redis_and_a_full_redis_leaves_no_half_posted_round(cluster):
    cluster.procs.extra_env["CROWDTRAIN_KEEP_VERSIONS"] = "2"  # the default is keys.KEEP_VERSIONS
    cluster.procs.aggregator()
    cluster.volunteer("bob")
    cluster.init("--shards", "1")
    rounds = 5
    document = cluster.procs.json("run", "--run", "r", "--rounds", str(rounds))
    assert [r["status"] for r in document["rounds"]] == ["done"] * rounds
    kept = [v for v in range(rounds + 1) if cluster.admin.exists(keys.model("r", v))]
    assert kept == [rounds - 1, rounds]
    out = cluster.procs.home / "v1.safetensors"
    assert cluster.procs.cli("export", "--run", "r", "--version", "1", "--out", str(out)).returncode == 0
    assert set(load_file(out)) == {"weight", "bias"}
    # act: Redis at its maxmemory, with the default eviction-safe policy
    used = int(cluster.admin.info("memory")["used_memory"])
    cluster.admin.config_set("maxmemory-policy", "noeviction")
    cluster.admin.config_set("maxmemory", max(1, used - 100_000))
    result = cluster.procs.cli("post-round", "--run", "r", "--shards", "4")
    cluster.admin.config_set("maxmemory", 0)
    # assert: one clear line, exit 2, and no round left open
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "maxmemory" in result.stderr
    current = cluster.store.rounds.current("r") or {}
    assert current.get("status") in ("done", "failed"), current
    assert cluster.wait_ended(cluster.post("--shards", "1"))["status"] == "done"


# --- 7. stuck rounds ----------------------------------------------------------------------------
def test_a_round_that_cannot_be_merged_fails_after_bounded_attempts_and_the_run_goes_on(cluster):
    # every merge raises in evaluate(), on the aggregator only
    cluster.procs.spawn(
        "aggregator", "-m", "cli.coordinator", "aggregator", "--name", "aggregator", TINY_EVALUATE_FAILS="1"
    )
    cluster.volunteer("bob")
    cluster.init("--shards", "1", "--deadline", "600")
    record = cluster.wait_ended(cluster.post())
    assert record["status"] == "failed", record
    assert "aggregation failed 3 times" in record["reason"] and "evaluation failure" in record["reason"]
    assert cluster.store.version("r") == 0
    assert cluster.post() == 2  # the next round opens


def test_two_coordinators_posting_at_once_open_one_round(cluster):
    cluster.init("--shards", "1", "--deadline", "600")
    posts = [
        subprocess.Popen(
            [sys.executable, "-m", "cli.coordinator", "post-round", "--run", "r"],
            env=cluster.procs.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cluster.procs.home,
        )
        for _ in range(2)
    ]
    codes = sorted(p.wait(120) for p in posts)
    assert codes == [0, 2]
    assert cluster.store.rounds.count("r") == 1


# --- 8. liveness -----------------------------------------------------------------------------
def test_a_volunteer_error_is_reported_and_the_shard_trained_again_before_the_deadline(cluster):
    cluster.procs.aggregator()
    cluster.volunteer("bob", TINY_FAIL_FIRST="1")  # its first shard raises, like an out-of-memory
    cluster.init("--shards", "2", "--deadline", "600")
    record = cluster.wait_ended(cluster.post())
    assert record["status"] == "done" and record["accepted"] == 2, record
    assert [x["reason"] for x in record["rejections"]] == [
        "volunteer error: RuntimeError: simulated volunteer failure"
    ]


def test_forged_shard_tasks_are_not_trained_and_a_refused_script_is_survived(cluster):
    mallory = cluster.mallory()
    bob = cluster.volunteer("bob")
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    for shard in range(2, 40):  # indices beyond the round's 2 shards, as in the reproduced attack
        mallory.app.send_task(
            "train_shard",
            queue="train",
            ignore_result=True,
            kwargs={"run": "r", "round": number, "shard": shard, "shards": 40, "version": 0},
        )
    cluster.admin.script_flush()  # what a Redis restart does to kombu's preloaded scripts
    cluster.wait_until(lambda: "not permitted" in cluster.procs.log_tail(100_000), "bob to meet the refusal")
    assert bob.poll() is None, cluster.procs.log_tail()
    cluster.procs.aggregator()
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["accepted"] == 2 and record["rejections"] == []
    uploads = list(cluster.admin.scan_iter(match=keys.upload_pattern("bob")))
    # shards bob took before the aggregator answered lease requests were offered again
    cluster.wait_until(lambda: cluster.store.queue_depths()["train"] == 0, "bob to skip the forged tasks")
    assert uploads == []
    # each forged shard skipped untrained ("is not one of the round's", or "round done" after it)
    forged = set(re.findall(r"skipping r round 1 shard (\d+): ", cluster.procs.log_tail(1_000_000)))
    assert len(forged - {"0", "1"}) >= 30, forged


# --- 9. quiet attackers: judged by their effect -------------------------------------------------
def _toward_optimum(cluster: Cluster, version: int, step: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A delta moving the tiny model ``step`` of the way to its optimum (negative: away from it).

    With ``seed``, each entry is off by up to 20%, as honest voices differ by their data
    (the same direction exactly would be refused as a copy).
    """
    return _toward(cluster.weights(version), step, seed)


def _toward(weights: dict[str, torch.Tensor], step: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """``_toward_optimum`` from the given weights."""
    job = TinyJob()
    delta = {"weight": step * (job.true_w.T - weights["weight"]), "bias": -step * weights["bias"]}
    if seed:
        gen = torch.Generator().manual_seed(seed)
        delta = {k: v * (1 + 0.2 * (2 * torch.rand(v.shape, generator=gen) - 1)) for k, v in delta.items()}
    return delta


def test_quiet_attackers_are_rejected_by_the_probe_and_lose_reputation(cluster):
    cluster.procs.aggregator()
    ann, ben, mallory = cluster.mallory("ann"), cluster.mallory("ben"), cluster.mallory()
    cluster.init("--shards", "3", "--deadline", "600")  # fedavg, --verify probe by default
    attacks = {
        # the honest direction reversed, at an honest norm: norm screens cannot see it
        "reversed": lambda good: {k: -v for k, v in good.items()},
        # a near-zero delta claiming full samples, for the credit (not ann's direction: not a copy)
        "free-rider": lambda good: {k: 1e-4 * torch.randn(v.shape) for k, v in good.items()},
    }
    for version, (attack, make) in enumerate(attacks.items()):
        number = cluster.post()
        good = _toward_optimum(cluster, version, 0.2, seed=1 + version)
        ann.deliver("r", number, 0, delta_blob(good, "r", number, 0, version))
        other = _toward_optimum(cluster, version, 0.15, seed=11 + version)
        ben.deliver("r", number, 1, delta_blob(other, "r", number, 1, version))
        mallory.deliver("r", number, 2, delta_blob(make(good), "r", number, 2, version, samples=24))
        record = cluster.wait_ended(number)
        assert record["status"] == "done" and record["accepted"] == 2, (attack, record)
        reasons = [x["reason"] for x in record["rejections"] if x["volunteer"] == "mallory"]
        assert len(reasons) == 1 and "probe" in reasons[0], (attack, record["rejections"])
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert people["mallory"]["accepted"] == 0 and people["mallory"]["samples"] == 0
    assert people["mallory"]["reputation"] < min(people["ann"]["reputation"], people["ben"]["reputation"])
    assert people["mallory"]["reputation"] < 0.5 < people["ann"]["reputation"]


def test_a_wrong_delta_on_a_replicated_shard_is_caught_by_its_replica(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    # the probe is off: the replica alone must catch it
    # no fair share: mallory, online, answers one shard and bob all the rest
    cluster.init(
        "--shards", "4", "--replicate", "0.25", "--verify", "none", "--deadline", "600", "--max-share", "1"
    )  # fmt: skip
    number = cluster.post()
    (twice,) = [int(x) for x in cluster.admin.smembers(keys.round_replicated("r", number))]
    wrong = _toward_optimum(cluster, 0, -0.1)  # plausible in size and form, the wrong way
    mallory.deliver("r", number, twice, delta_blob(wrong, "r", number, twice, 0, samples=24))
    cluster.wait_until(lambda: cluster.round(number).get("accepted") == 1, "mallory's upload")
    cluster.volunteer("bob")  # trains every shard, and the second posting of mallory's
    record = cluster.wait_ended(number)
    reasons = [x["reason"] for x in record["rejections"] if x["volunteer"] == "mallory"]
    assert len(reasons) == 1 and reasons[0].startswith("replica: disagrees with bob's"), record
    assert record["status"] == "done" and record["accepted"] == 4
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert people["mallory"]["accepted"] == 0 and people["bob"]["accepted"] == 4, people


# --- 10. the announcement list ------------------------------------------------------------------
def test_the_announcement_list_is_append_only_bounded_and_credits_only_the_uploader(cluster):
    aggregator = cluster.procs.aggregator()
    ann, mallory = cluster.mallory("ann"), cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    announce = keys.announcements()
    # what mallory may not do to the list others announce on: read it, take, cut or replace their entries
    for action in (
        lambda: mallory.redis.lrange(announce, 0, -1),
        lambda: mallory.redis.llen(announce),
        lambda: mallory.redis.lpop(announce),
        lambda: mallory.redis.rpop(announce),
        lambda: mallory.redis.brpop([announce], 1),
        lambda: mallory.redis.lpush(announce, b"first in line"),
        lambda: mallory.redis.delete(announce),
        lambda: mallory.redis.expire(announce, 1),
        lambda: mallory.redis.set(announce, b"not a list"),
    ):
        _refused(action)
    ann_blob = delta_blob(_tiny_delta(0.02), "r", number, 0, 0)
    ann_token = ann.upload("r", number, 0, ann_blob, ann.lease("r", number, 0)["token"])  # not announced
    own_blob = delta_blob(_tiny_delta(0.04, bump=1), "r", number, 1, 0)
    own_token = mallory.lease("r", number, 1)["token"]
    own = keys.upload("mallory", "r", number, 1, mallory.upload("r", number, 1, own_blob, own_token))

    # act: junk, entries far longer than a key, another run, ann's token under mallory's own name,
    # and mallory's one upload announced 50 times
    junk = [b"\xff\xfe", b"ct:upload:mallory:r:1:0:../../etc", keys.run_version("r").encode()]
    mallory.redis.rpush(announce, *junk, b"x" * 300, b"\0" * 4_000_000)
    mallory.redis.rpush(announce, keys.upload("mallory", "ghost", 1, 0, ann_token))
    mallory.announce("r", number, 0, ann_token)
    mallory.redis.rpush(announce, *[own] * 50)
    cluster.wait_until(lambda: cluster.round(number).get("accepted") == 1, "mallory's shard to count")
    cluster.wait_until(lambda: cluster.admin.llen(announce) == 0, "the list to be drained")

    # assert: her upload counted once, for its bytes once; ann's token did her no good
    info = cluster.round(number)
    assert (info["accepted"], info["rejected"], int(info["uplink_bytes"])) == (1, 0, len(own_blob)), info
    assert {keys.volunteer_of(k) for k in cluster.store.rounds.accepted_uploads("r", number).values()} == {
        "mallory"
    }
    assert cluster.admin.exists(keys.upload("ann", "r", number, 0, ann_token)), "ann's upload was touched"
    # an announcement is only a hint: even naming ann's real upload counts it as ann's, not mallory's
    mallory.announce("r", number, 0, ann_token, owner="ann")
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["accepted"] == 2, record
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert people["ann"]["accepted"] == 1 and people["mallory"]["accepted"] == 1, people
    logs = cluster.procs.log_tail(200_000)
    assert "dropped 2 announcements longer than" in logs and "dropped 3 malformed announcements" in logs
    assert aggregator.poll() is None, logs[-3000:]


# --- 11. small rounds and copies ----------------------------------------------------------------
def _pushed_back(cluster: Cluster, version: int, factor: float = -3.0) -> dict[str, torch.Tensor]:
    """The issue's lone attacker: ``factor`` x the update that published ``version``."""
    now, before = cluster.weights(version), cluster.weights(version - 1)
    return {name: factor * (now[name] - before[name]) for name in now}


def test_a_lone_voice_that_pushes_the_model_back_is_rejected_by_the_probe(cluster):
    cluster.procs.aggregator()
    ann, mallory = cluster.mallory("ann"), cluster.mallory()
    cluster.init("--shards", "1", "--deadline", "600")  # fedavg, --verify probe by default
    number = cluster.post()
    ann.deliver("r", number, 0, delta_blob(_toward_optimum(cluster, 0, 0.2, seed=1), "r", number, 0, 0))
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["rejections"] == [], record  # a lone honest voice is kept
    for _ in range(2):  # twice: a failed round leaves the model at version 1
        number = cluster.post()
        mallory.deliver("r", number, 0, delta_blob(_pushed_back(cluster, 1), "r", number, 0, 1))
        record = cluster.wait_ended(number)
        assert record["status"] == "failed" and cluster.store.version("r") == 1, record
        (rejection,) = record["rejections"]
        assert rejection["volunteer"] == "mallory" and rejection["reason"].startswith("probe: a lone voice")
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert people["mallory"]["accepted"] == 0 and people["mallory"]["reputation"] < 0.5


def test_a_lone_voice_in_an_asynchronous_buffer_that_pushes_the_model_back_is_rejected(cluster):
    cluster.procs.aggregator()
    ann, mallory = cluster.mallory("ann"), cluster.mallory()
    cluster.init("--mode", "async", "--buffer", "1", "--shards", "2", "--deadline", "600")
    driver = cluster.procs.spawn("run", "-m", "cli.coordinator", "run", "--run", "r", "--rounds", "3")
    try:
        cluster.wait_until(lambda: int(cluster.round(1).get("shards") or 0) >= 2, "buffer 1's jobs")
        good = _toward_optimum(cluster, 0, 0.2, seed=1)
        ann.deliver("r", 1, 0, delta_blob(good, "r", 1, 0, 0))
        assert cluster.wait_ended(1)["status"] == "done"  # a lone honest voice is kept
        # the second job of buffer 1, answered once version 1 is out: counted in buffer 2, 1 version stale
        mallory.deliver("r", 1, 1, delta_blob(_pushed_back(cluster, 1), "r", 1, 1, 0))
        cluster.wait_until(lambda: cluster.round(2).get("status") in ("done", "failed"), "buffer 2 to end")
        record = round_record(cluster.store, "r", 2)
    finally:
        cluster.procs.kill(driver)
    assert record["status"] == "failed" and cluster.store.version("r") == 1, record
    (rejection,) = record["rejections"]
    assert rejection["volunteer"] == "mallory" and rejection["reason"].startswith("probe: a lone voice")


def test_a_re_encoded_copy_of_another_voice_or_of_the_last_update_is_refused_as_a_copy(cluster):
    cluster.procs.aggregator()
    ann, ben, mallory = cluster.mallory("ann"), cluster.mallory("ben"), cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600")
    number = cluster.post()
    ann.deliver("r", number, 0, delta_blob(_toward_optimum(cluster, 0, 0.2, seed=1), "r", number, 0, 0))
    ben.deliver("r", number, 1, delta_blob(_toward_optimum(cluster, 0, 0.15, seed=2), "r", number, 1, 0))
    assert cluster.wait_ended(number)["accepted"] == 2
    # ann's delta of this round, decoded and encoded again (other bytes, the same direction)
    number = cluster.post()
    good = _toward_optimum(cluster, 1, 0.2, seed=3)
    ann.deliver("r", number, 0, delta_blob(good, "r", number, 0, 1))
    copied = {k: v.half().float() for k, v in good.items()}
    mallory.deliver("r", number, 1, delta_blob(copied, "r", number, 1, 1, samples=24))
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["accepted"] == 1, record
    (rejection,) = record["rejections"]
    assert rejection["volunteer"] == "mallory" and rejection["reason"].startswith("copy: nearly the same"), (
        record
    )
    # the update that published version 2, re-sent as a delta of its own
    number = cluster.post("--shards", "3")
    ann.deliver("r", number, 0, delta_blob(_toward_optimum(cluster, 2, 0.2, seed=4), "r", number, 0, 2))
    ben.deliver("r", number, 1, delta_blob(_toward_optimum(cluster, 2, 0.15, seed=5), "r", number, 1, 2))
    replay = _pushed_back(cluster, 2, factor=1.0)
    mallory.deliver(
        "r", number, 2, delta_blob({k: v.half().float() for k, v in replay.items()}, "r", number, 2, 2)
    )
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["accepted"] == 2, record
    (rejection,) = record["rejections"]
    assert rejection["volunteer"] == "mallory" and "copy: the last published update" in rejection["reason"]
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert people["mallory"]["accepted"] == 0 and people["ann"]["accepted"] == 3


def test_min_voices_fails_a_round_of_fewer_volunteers_and_says_how_many(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600", "--min-voices", "2")
    number = cluster.post()
    for shard in (0, 1):  # both shards of the round, from one volunteer: one voice
        delta = _toward_optimum(cluster, 0, 0.1, seed=1 + shard)
        mallory.deliver("r", number, shard, delta_blob(delta, "r", number, shard, 0))
    record = cluster.wait_ended(number)
    assert record["status"] == "failed" and cluster.store.version("r") == 0, record
    assert record["reason"] == "1 voice (volunteers) with accepted deltas, 2 needed (--min-voices)"
    assert all(v["accepted"] == 0 for v in cluster.procs.json("status")["volunteers"])  # no credit


# --- 12. Sybils and boosted voices (coordinator.merging.sybils) ----------------------------------------
def _sideways(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The Sybils' harmful push: half an honest step plus twice its length across the optimum's
    direction (the probe sees a voice that helps at first), each Sybil off by up to 40%."""
    good = _toward(weights, 0.2)
    across = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    along = good["weight"] / good["weight"].norm()
    across = across - (across * along).sum() * along
    across = across / across.norm() * 2 * float(torch.cat([v.flatten() for v in good.values()]).norm())
    gen = torch.Generator().manual_seed(seed)
    push = {"weight": 0.5 * good["weight"] + across, "bias": 0.5 * good["bias"]}
    return {k: v * (1 + 0.4 * (2 * torch.rand(v.shape, generator=gen) - 1)) for k, v in push.items()}


def test_two_sybils_of_four_voices_share_one_voice_are_clipped_and_leave_the_loss_near_clean(cluster):
    cluster.procs.aggregator()
    ann, ben, eve, mallory = (cluster.mallory(n) for n in ("ann", "ben", "eve", "mallory"))
    cluster.init("--shards", "4", "--deadline", "600")  # fedavg, --verify probe by default
    for version in range(4):  # ann and ben earn a record: four rounds of two shards
        number = cluster.post("--shards", "2")
        for shard, (who, step) in enumerate(((ann, 0.2), (ben, 0.15))):
            good = _toward_optimum(cluster, version, step, seed=1 + shard + 10 * version)
            who.deliver("r", number, shard, delta_blob(good, "r", number, shard, version))
        record = cluster.wait_ended(number)
        assert record["status"] == "done", str(record)
    clean = cluster.weights(4)
    for version in range(4, 7):  # two new identities push one harmful direction, boosted 5x
        number, weights = cluster.post(), cluster.weights(version)
        honest = [_toward(weights, 0.2, seed=61 + version), _toward(weights, 0.15, seed=71 + version)]
        for shard, (who, delta) in enumerate(zip((ann, ben), honest)):
            who.deliver("r", number, shard, delta_blob(delta, "r", number, shard, version))
        for shard, who in ((2, eve), (3, mallory)):
            push = {k: 5 * v for k, v in _sideways(weights, seed=shard + 10 * version).items()}
            who.deliver("r", number, shard, delta_blob(push, "r", number, shard, version))
        record = cluster.wait_ended(number)
        assert record["status"] == "done" and record["accepted"] == 4, str(
            record
        )  # past the probe and screen
        steps = [_toward(clean, 0.2, seed=61 + version), _toward(clean, 0.15, seed=71 + version)]
        clean = {k: v + (steps[0][k] + steps[1][k]) / 2 for k, v in clean.items()}
    job = TinyJob()
    model = job.build_model()
    model.load_state_dict(cluster.weights(7))
    attacked = job.evaluate(model)["eval_loss"]
    model.load_state_dict(clean)
    assert attacked <= 1.2 * job.evaluate(model)["eval_loss"], (attacked, job.evaluate(model))
    people = {v["name"]: v for v in cluster.procs.json("volunteers")["volunteers"]}
    assert people["eve"]["cluster"] == people["mallory"]["cluster"] == "eve", people
    assert people["ann"]["cluster"] != "eve" and people["ann"]["age"] >= 0, people


def test_with_outliers_drop_a_voice_pointing_away_from_the_majority_merges_at_weight_zero(cluster):
    cluster.procs.aggregator()
    ann, ben, mallory = (cluster.mallory(n) for n in ("ann", "ben", "mallory"))
    cluster.init("--shards", "3", "--deadline", "600", "--outliers", "drop")
    number, weights = cluster.post(), cluster.weights(0)
    honest = [_toward(weights, 0.2, seed=61), _toward(weights, 0.15, seed=71)]
    for shard, (who, delta) in enumerate(zip((ann, ben), honest)):
        who.deliver("r", number, shard, delta_blob(delta, "r", number, shard, 0))
    # a backdoor's voice: it helps the probe at first, but points where the honest ones do not
    mallory.deliver("r", number, 2, delta_blob(_sideways(weights, seed=2), "r", number, 2, 0))
    record = cluster.wait_ended(number)
    assert record["status"] == "done" and record["accepted"] == 3, str(record)  # not rejected
    assert record["outliers"] == ["mallory"], str(record)
    merged = cluster.weights(1)
    for key, value in weights.items():  # the honest pair's mean, nothing of mallory's
        assert torch.allclose(merged[key], value + (honest[0][key] + honest[1][key]) / 2, atol=1e-5), key
