"""Who answers which shard is the trusted side's decision (``coordinator.rounds.leases``), tried for real.

Each test starts a Redis 7 with real ACL users (``coordinator volunteer-credentials``),
a real aggregator and real volunteer processes, and attacks with nothing but one
volunteer's credentials (``tests.fixtures.attacker.Mallory``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import redis

from broker import blobs, keys
from broker.transfer import send_to_slot
from tests.conftest import Processes
from tests.fixtures.attacker import delta_blob
from tests.fixtures.objects import SeaweedServer
from tests.integration.test_attacks import TINY, Cluster, _tiny_delta
from tests.integration.test_blob_store import seaweed  # noqa: F401 (fixture)

pytestmark = pytest.mark.attack


@pytest.fixture
def cluster(admin_processes: tuple[Processes, redis.Redis]) -> Iterator[Cluster]:
    procs, admin = admin_processes
    yield Cluster(procs, admin)


def _copy_digest(cluster: Cluster, key: str) -> str | None:
    blob = blobs.read(cluster.admin, key)
    return hashlib.sha256(blob).hexdigest() if blob is not None else None


# --- an accepted upload is final ---------------------------------------------------------------
def test_an_accepted_upload_is_final_whatever_its_volunteer_announces_after(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600", "--verify", "none")
    number = cluster.post()
    good = [_tiny_delta(0.01 * (i + 1)) for i in range(2)]
    token = mallory.deliver("r", number, 0, delta_blob(good[0], "r", number, 0, 0))
    cluster.wait_until(lambda: cluster.round(number).get("accepted") == 1, "shard 0 to be accepted")
    copy = cluster.store.rounds.accepted_uploads("r", number)[0]
    digest = _copy_digest(cluster, copy)
    assert digest is not None
    # act 1: the same upload key again, other (valid) bytes, announced again: an overwrite
    other = delta_blob(_tiny_delta(0.5), "r", number, 0, 0)
    mallory.upload("r", number, 0, other, token)
    mallory.announce("r", number, 0, token)
    cluster.wait_until(lambda: not mallory_uploads(cluster), "the overwrite to be dropped")
    assert _copy_digest(cluster, copy) == digest, "the accepted copy was replaced"
    # act 2: bytes that fail a check, announced again: a delete
    mallory.upload("r", number, 0, b"junk that is not the wire format", token)
    mallory.announce("r", number, 0, token)
    cluster.wait_until(lambda: not mallory_uploads(cluster), "the junk to be dropped")
    assert _copy_digest(cluster, copy) == digest, "the accepted copy was deleted"
    assert cluster.round(number).get("rejected") == 0
    mallory.deliver("r", number, 1, delta_blob(good[1], "r", number, 1, 0))
    record = cluster.wait_ended(number)
    # assert: version 1 = version 0 + the mean of the two deltas validated first
    assert record["status"] == "done" and record["accepted"] == 2, record
    before, after = cluster.weights(0), cluster.weights(1)
    for name in before:
        expected = before[name] + (good[0][name] + good[1][name]) / 2
        assert float((after[name] - expected).abs().max()) < 1e-6, name
    # and no volunteer may read another's accepted copy (nor its own)
    with pytest.raises(redis.RedisError, match="permission"):
        mallory.redis.lrange(cluster.store.rounds.accepted_uploads("r", number)[1], 0, -1)


def mallory_uploads(cluster: Cluster) -> list[bytes]:
    return list(cluster.admin.scan_iter(match=keys.upload_pattern("mallory")))


# --- only the volunteer given a shard answers it ------------------------------------------------
def test_a_racer_uploading_every_shard_at_round_open_is_refused_and_the_model_is_unharmed(cluster):
    cluster.procs.aggregator()
    cluster.volunteer("bob")
    mallory = cluster.mallory()
    flags = ("--shards", "4", "--deadline", "600", "--local-steps", "20")
    cluster.procs.json("init", "--run", "clean", "--job", TINY, "--compression", "none", *flags)
    clean = cluster.procs.json("run", "--run", "clean", "--rounds", "2")
    cluster.init(*flags)
    stop = threading.Event()

    def race() -> None:  # each round, the moment it opens: a harmful delta for every shard, no task
        seen = 0
        while not stop.is_set():
            number = int(cluster.admin.get(keys.run_rounds("r")) or 0)
            if number > seen:
                seen = number
                base = cluster.store.version("r")
                for shard in range(4):
                    harm = delta_blob(_tiny_delta(-3.0), "r", number, shard, base)
                    mallory.deliver("r", number, shard, harm, lease=False)
            time.sleep(0.001)

    racer = threading.Thread(target=race, daemon=True)
    racer.start()
    try:
        attacked = cluster.procs.json("run", "--run", "r", "--rounds", "2")
    finally:
        stop.set()
        racer.join()
    assert [r["accepted"] for r in attacked["rounds"]] == [4, 4], cluster.procs.log_tail()
    people = {v["name"]: v for v in cluster.procs.json("status")["volunteers"]}
    assert "mallory" not in people or people["mallory"]["accepted"] == 0, people
    assert attacked["final"]["eval_loss"] <= 1.1 * clean["final"]["eval_loss"], (attacked, clean)
    assert "no lease of its names it" in cluster.procs.log_tail(400_000)


def test_a_volunteer_holds_at_most_its_fair_share_of_a_round(cluster):
    cluster.procs.aggregator()
    ann, mallory = cluster.mallory("ann"), cluster.mallory()
    cluster.init("--shards", "4", "--deadline", "600")
    number = cluster.post()
    assert ann.lease("r", number, 0)["granted"]  # ann is online: she asked for a lease
    answers = [mallory.lease("r", number, shard) for shard in (1, 2, 3)]
    # act: mallory asks for every other shard, and for ann's
    assert [a["granted"] for a in answers] == [True, True, False], answers
    assert answers[2]["reason"] == "share"
    # a shard given once is no one else's while its lease lives, nor its holder's twice
    assert mallory.lease("r", number, 0)["reason"] == "leased"
    assert ann.lease("r", number, 1)["reason"] == "leased"
    assert ann.lease("r", number, 0)["reason"] == "leased"


def test_leases_asked_for_and_refused_again_and_again_post_a_shard_at_most_once_per_offer_period(cluster):
    cluster.procs.aggregator()
    ann, mallory = cluster.mallory("ann"), cluster.mallory()
    # the default lease (20 s): an offer period of 10 s; one shard each while another is online
    cluster.init("--shards", "4", "--deadline", "600", "--max-share", "0.25")
    number = cluster.post()  # its four messages wait on `train`: no worker takes them
    assert ann.lease("r", number, 0)["granted"] and mallory.lease("r", number, 1)["granted"]
    began = time.monotonic()
    # act: mallory asks for the two shards nobody holds, again and again
    reasons = {mallory.lease("r", number, shard)["reason"] for shard in (2, 3) * 20}
    periods = 1 + int((time.monotonic() - began) // 10)
    assert reasons == {"share"}, reasons
    # each went out again at its first refusal (mallory dropped the message it would have taken) ...
    cluster.wait_until(lambda: cluster.admin.llen(keys.TRAIN_QUEUE) >= 6, "shards 2 and 3 posted again")
    offers = cluster.admin.hgetall(keys.offers("r", number))
    # ... and at most once per offer period after, however often it was refused
    assert 6 <= cluster.admin.llen(keys.TRAIN_QUEUE) <= 4 + 2 * periods, offers
    assert 1 <= int(offers[b"2:refused"]) <= periods and 1 <= int(offers[b"3:refused"]) <= periods, offers
    assert not any(field.endswith((b":waited",)) for field in offers), offers  # the queue held messages


# --- hoarding ----------------------------------------------------------------------------------
def test_hoarded_messages_delay_a_round_by_a_few_offers_not_its_deadline(cluster):
    cluster.procs.aggregator()
    bob = cluster.volunteer("bob")
    mallory = cluster.mallory()
    cluster.init("--shards", "2", "--deadline", "600", "--lease", "6")
    cluster.wait_online("bob")
    stop = threading.Event()
    hoarded: list[bytes] = []

    def hoard() -> None:  # a raw BRPOP: the message never enters kombu's unacked
        client = redis.Redis.from_url(mallory.url)
        while not stop.is_set():
            reply = client.brpop([keys.TRAIN_QUEUE], timeout=1)
            if reply is not None:
                hoarded.append(reply[1])

    hoarders = [threading.Thread(target=hoard, daemon=True) for _ in range(3)]
    for thread in hoarders:
        thread.start()
    try:
        records = [cluster.wait_ended(cluster.post()) for _ in range(2)]
    finally:
        stop.set()
        for thread in hoarders:
            thread.join()
    assert [r["status"] for r in records] == ["done", "done"], cluster.procs.log_tail()
    assert all(r["accepted"] == 2 and r["seconds"] < 120 for r in records), records
    assert hoarded, "the hoarders took nothing: the test tested nothing"
    assert bob.poll() is None


# --- the blob store's upload slots -------------------------------------------------------------
@pytest.fixture
def blob_cluster(
    admin_processes: tuple[Processes, redis.Redis],
    seaweed: SeaweedServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cluster]:
    procs, admin = admin_processes
    procs.extra_env.update(seaweed.env())  # the trusted side's credentials; volunteers get none
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    yield Cluster(procs, admin)


def test_an_upload_slot_is_read_only_by_the_volunteer_given_the_shard(blob_cluster):
    blob_cluster.procs.aggregator()
    blob_cluster.volunteer("bob")
    mallory = blob_cluster.mallory()
    blob_cluster.procs.json(
        "init", "--run", "r", "--job", TINY, "--compression", "none", "--shards", "2",
        "--local-steps", "3", "--blob-store", "s3://crowdtrain/runs", "--deadline", "600",
    )  # fmt: skip
    blob_cluster.wait_online("bob")
    stop = threading.Event()
    framed: dict[str, dict] = {}

    def readable(client: redis.Redis) -> list[bytes]:
        """Every message mallory can read with its rights: whole sources where allowed, else popped."""
        messages: list[bytes] = []
        for read in (
            lambda: client.hgetall("unacked").values(),
            lambda: client.lrange(keys.TRAIN_QUEUE, 0, -1),
        ):
            try:
                messages += read()
            except redis.exceptions.NoPermissionError:  # the narrowed kombu selectors refuse it
                continue
        popped = client.rpop(keys.TRAIN_QUEUE)  # a message taken as a worker takes it, then put back
        if popped is not None:
            messages.append(popped)
            client.rpush(keys.TRAIN_QUEUE, popped)
        return messages

    def frame() -> None:  # every slot mallory can read, in the queue or in kombu's unacked: junk, again
        client = redis.Redis.from_url(mallory.url)
        while not stop.is_set():
            for raw in readable(client):
                for slot in _slots(raw):
                    framed[slot["object"]] = slot
            for slot in list(framed.values()):  # valid for days: rewritten after the honest upload
                try:
                    send_to_slot(slot, b"junk written into another volunteer's slot")
                except Exception:  # a form past its use: keep going
                    continue
            time.sleep(0.01)

    framer = threading.Thread(target=frame, daemon=True)
    framer.start()
    try:
        records = [blob_cluster.wait_ended(blob_cluster.post()) for _ in range(2)]
    finally:
        stop.set()
        framer.join()
    assert [(r["status"], r["accepted"], r["rejected"]) for r in records] == [("done", 2, 0)] * 2, (
        records,
        framed,
    )
    people = {v["name"]: v for v in blob_cluster.procs.json("status")["volunteers"]}
    assert people["bob"]["rejected"] == 0 and people["bob"]["accepted"] == 4, people
    assert not framed, f"upload slots readable by every volunteer: {sorted(framed)}"


def _slots(raw: bytes) -> list[dict]:
    """The upload slots a kombu message (as kept in the queue or in ``unacked``) carries."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list):  # unacked: [message, exchange, routing key]
            envelope = envelope[0]
        body = base64.b64decode(envelope["body"])
        _, kwargs, _ = (
            msgpack.unpackb(body) if envelope["content-type"].endswith("msgpack") else json.loads(body)
        )
    except (ValueError, KeyError, TypeError):
        return []
    slot = kwargs.get("upload") if isinstance(kwargs, dict) else None
    return [slot] if isinstance(slot, dict) and "object" in slot else []


# --- asynchronous replays ----------------------------------------------------------------------
def test_an_old_asynchronous_delta_sent_again_for_a_newer_job_is_refused_stale(cluster):
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.procs.json(
        "init", "--run", "r", "--job", TINY, "--compression", "none", "--local-steps", "3",
        "--shards", "2", "--mode", "async", "--buffer", "1", "--deadline", "600",
    )  # fmt: skip
    cluster.store.rounds.open("r", 0, 1, 600.0)
    cluster.store.rounds.add_jobs("r", 1, 2)
    old = delta_blob(_tiny_delta(0.02), "r", 1, 0, 0)
    mallory.deliver("r", 1, 0, old)  # job 0 of version 0: fresh, merged into version 1
    cluster.wait_until(lambda: cluster.store.version("r") >= 1, "version 1")
    cluster.wait_until(lambda: (cluster.store.rounds.current("r") or {}).get("status") == "open", "a buffer")
    current = cluster.store.rounds.current("r") or {}
    number = int(current["round"])
    cluster.store.rounds.add_jobs("r", number, 2)
    # act: the delta trained on version 0, sent again for a job on version 1
    mallory.deliver("r", number, 0, old)
    cluster.wait_until(lambda: cluster.round(number).get("rejected") == 1, "the replay to be refused")
    reasons = [json.loads(v)["reason"] for v in cluster.admin.hvals(keys.round_rejections("r", number))]
    assert any("stale" in r for r in reasons), reasons
    assert cluster.store.version("r") == 1
