"""Runs whose blobs live in an S3-compatible object store (``init --blob-store``), on a real SeaweedFS.

The aggregator and the coordinator hold the store's credentials; volunteers
hold none: they read models through presigned GET URLs and write each upload
through the presigned POST form of their job's slot, which caps its size.
"""

from __future__ import annotations

import hashlib
import http.server
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker import blobs, keys
from broker.pointers import MAX_POINTER, ObjectStoreError, Pointer
from broker.transfer import send_to_slot
from coordinator.runs.context import RunContexts
from coordinator.views.documents import round_record
from serialization import dumps
from tests.conftest import Processes, free_port
from tests.fixtures.objects import READER, SeaweedServer
from tests.integration.test_attacks import Cluster, _tiny_delta

BUCKET = "crowdtrain"
STORE = f"s3://{BUCKET}/runs"
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": ""}


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path / "seaweed").start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def cluster(
    admin_processes: tuple[Processes, redis.Redis], seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    procs, admin = admin_processes
    procs.extra_env.update(seaweed.env())  # the trusted side's credentials; volunteers override them
    for name, value in seaweed.env().items():  # this process reads the store as the trusted side too
        monkeypatch.setenv(name, value)
    yield Cluster(procs, admin)


def _objects(seaweed: SeaweedServer, prefix: str) -> list[str]:
    listing = seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_a_run_keeps_its_blobs_in_the_store_and_volunteers_need_no_credentials(cluster, seaweed):
    cluster.procs.aggregator()
    cluster.procs.volunteer("alice", **NO_CREDENTIALS)  # the admin URL, but no store credentials
    cluster.procs.json(
        "init", "--run", "s3run", "--job", "charlm", "--compression", "none", "--shards", "2",
        "--local-steps", "3", "--blob-store", STORE, "--deadline", "300",
    )  # fmt: skip
    document = cluster.procs.json("run", "--run", "s3run", "--rounds", "2")

    assert [r["accepted"] for r in document["rounds"]] == [2, 2], cluster.procs.log_tail()
    assert all(math.isfinite(r["eval_loss"]) for r in document["rounds"])
    # Redis keeps pointers only: every model version and upload is an object
    for version in (0, 1, 2):
        pointer = blobs.read_pointer(cluster.admin, keys.model("s3run", version))
        assert pointer is not None and pointer.size > 100_000, f"version {version} is no pointer"
        assert pointer.object.startswith("runs/runs/s3run/blobs/")
    largest = max(
        len(cluster.admin.lindex(key, i) or b"")
        for key in cluster.admin.scan_iter("ct:run:s3run:*")
        if cluster.admin.type(key) == b"list"
        for i in range(cluster.admin.llen(key))
    )
    assert largest <= MAX_POINTER, f"a {largest}-byte value of the run is in Redis"
    assert len(_objects(seaweed, "runs/uploads/s3run/")) >= 4, "each accepted delta went to its slot"
    # the trusted side reads a version back from the store, bit for bit what was trained
    blob = cluster.store.model_blob("s3run", 2)
    assert blob is not None and hashlib.sha256(blob).digest() == pointer.sha256


def test_bad_blob_stores_are_one_line_exit_2_and_nothing_is_written(cluster, seaweed):
    closed = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["--blob-store", "s3://A/x"], {}, "use s3://BUCKET/PREFIX"),
        (["--blob-store", "http://bucket/x"], {}, "use s3://BUCKET/PREFIX"),
        (["--blob-store", STORE], {"AWS_ENDPOINT_URL": closed}, "cannot be written"),
        (["--blob-store", "s3://no-such-bucket/x"], {}, "NoSuchBucket"),
        (
            ["--blob-store", STORE],
            dict(zip(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), READER)),
            "Access",
        ),
        ([], {"CROWDTRAIN_BLOB_STORE": "s3://no-such-bucket/x"}, "NoSuchBucket"),
    ]
    for flags, env, expected in cases:
        result = cluster.procs.cli("init", "--run", "bad", "--job", "charlm", *flags, **env)
        assert result.returncode == 2, (flags, env, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (flags, env, result.stderr)
        assert "Traceback" not in result.stderr
    assert cluster.store.runs() == [], "no run was created"
    assert _objects(seaweed, "runs/runs/") == [], "nothing was written to the store"


class _Listener(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_an_upload_pointer_is_honoured_only_for_its_own_slot_and_bytes(cluster, seaweed):
    """A volunteer's pointer names an object; the aggregator checks where it lies and what it holds."""
    cluster.procs.aggregator()
    mallory = cluster.mallory()
    cluster.init("--shards", "6", "--deadline", "600", "--blob-store", STORE, "--verify", "none")
    number = cluster.post()
    bound = RunContexts(cluster.store)["r"].upload_bound
    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Listener)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    trap = f"http://127.0.0.1:{listener.server_address[1]}/steal"

    leases: dict[int, dict] = {}  # what the trusted side gave Mallory for each shard

    def slot(shard: int) -> dict[str, str]:  # the upload slot that came with the shard's lease
        made = leases.setdefault(shard, mallory.lease("r", number, shard))["upload"]
        assert made is not None
        return made

    def point(shard: int, pointer: Pointer) -> None:
        token = leases.setdefault(shard, mallory.lease("r", number, shard))["token"]
        key = keys.upload("mallory", "r", number, shard, token)
        pipe = mallory.redis.pipeline(transaction=True)
        blobs.queue_write(pipe, key, pointer.pack(), magic=blobs.POINTER_MAGIC)
        pipe.execute()
        mallory.announce("r", number, shard, token)

    good = dumps(_tiny_delta(0.1), {"samples": 8, "base_version": 0})
    digest = hashlib.sha256(good).digest()
    model = blobs.read_pointer(mallory.redis, keys.model("r", 0))  # volunteers may read it
    assert model is not None
    honest = slot(0)
    send_to_slot(honest, good)
    # 0: honest bytes in its own slot, with a URL of its own choosing that must not be followed
    point(0, Pointer(honest["object"], len(good), digest, url=trap, expires=0))
    # 1: the run's model object instead of an upload
    point(1, Pointer(model.object, model.size, model.sha256))
    # 2: another shard's slot (shard 0's bytes, claimed for shard 2)
    point(2, Pointer(honest["object"], len(good), digest))
    # 3: bytes that are not the ones declared
    third = slot(3)
    send_to_slot(third, good + b"x")
    point(3, Pointer(third["object"], len(good), digest))
    # 4: a size over the run's bound, refused before any byte is fetched
    point(4, Pointer(slot(4)["object"], bound + 1, digest))
    # 5: a slot never written
    point(5, Pointer(slot(5)["object"], len(good), digest))

    cluster.wait_until(
        lambda: cluster.round(number).get("rejected") == 5 and cluster.round(number).get("accepted") == 1,
        "one upload accepted and five refused",
    )
    reasons = {x["shard"]: x["reason"] for x in round_record(cluster.store, "r", number)["rejections"]}
    assert "points outside" in reasons[1] and "points outside" in reasons[2], reasons
    assert "sha256" in reasons[3] or "bytes" in reasons[3], reasons
    assert "over the limit" in reasons[4], reasons
    assert "not in the store" in reasons[5], reasons
    assert _Listener.hits == [], "the aggregator followed a URL a volunteer wrote"
    listener.shutdown()


def test_an_upload_slot_takes_no_more_than_the_runs_upload_bound(cluster, seaweed):
    """A volunteer with a job's slot cannot park more than an honest upload's bytes in the store."""
    cluster.init("--shards", "2", "--blob-store", STORE, "--verify", "none")
    number = cluster.post()
    bound = RunContexts(cluster.store)["r"].upload_bound
    assert cluster.store.run_config("r").upload_bound == bound
    slot = cluster.store.upload_slot("r", number, 0)
    assert slot is not None
    with pytest.raises(ObjectStoreError, match="refused"):
        send_to_slot(slot, bytes(bound + 1))
    assert _objects(seaweed, slot["object"]) == [], "an oversized upload was kept"
    size, _ = send_to_slot(slot, bytes(bound))
    assert size == bound and _objects(seaweed, slot["object"]) == [slot["object"]]
