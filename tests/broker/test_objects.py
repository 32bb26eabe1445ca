"""The object store's parts: locations, pointers, job slots, URL renewal and sweeping (real SeaweedFS)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from broker import blobs, keys
from broker.errors import SettingsError
from broker.objects import Location
from broker.pointers import ObjectMismatch, ObjectStoreError, Pointer
from broker.run_config import RunConfig
from broker.transfer import UrlReader, send_to_slot
from coordinator.store import Store
from tasks.arguments import BadArguments, checked
from tests.conftest import RedisServer
from tests.fixtures.objects import SeaweedServer

BUCKET = "units"


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [("s3://crowdtrain", "crowdtrain", ""), ("s3://crowdtrain/a/b/", "crowdtrain", "a/b")],
)
def test_a_location_is_a_bucket_and_a_prefix(url, bucket, prefix):
    assert Location.parse(url) == Location(bucket, prefix)


@pytest.mark.parametrize(
    "url", ["s3://", "s3://ab/x", "s3://Upper/x", "gs://bucket/x", "s3://b_b/x", "s3://bkt/../x"]
)
def test_a_malformed_location_is_a_settings_error(url):
    with pytest.raises(SettingsError, match="s3://BUCKET/PREFIX"):
        Location.parse(url)


def test_a_pointer_round_trips_and_malformed_ones_are_refused():
    pointer = Pointer("p/runs/r/blobs/x", 10, b"\0" * 32, "https://store/x", 5.0)
    assert Pointer.unpack(pointer.pack(), "k") == pointer
    bad = [
        b"\xc1",  # not msgpack
        msgpack.packb([1, 2]),
        msgpack.packb({"object": "x", "size": 1}),  # no digest
        msgpack.packb({"object": "x", "size": -1, "sha256": b"\0" * 32}),
        msgpack.packb({"object": "x", "size": 1, "sha256": b"\0" * 31}),
        msgpack.packb({"object": "../x", "size": 1, "sha256": b"\0" * 32}),
        msgpack.packb({"object": "a/../x", "size": 1, "sha256": b"\0" * 32}),
        msgpack.packb({"object": "x", "size": 1, "sha256": b"\0" * 32, "url": "file:///etc/passwd"}),
        msgpack.packb({"object": "x", "size": 1, "sha256": b"\0" * 32, "extra": 1}),
        b"\x00" * 5000,  # too long
    ]
    for raw in bad:
        with pytest.raises(ValueError):
            Pointer.unpack(raw, "k")


def test_a_job_slot_in_a_task_message_is_checked():
    name = "p/uploads/r/1/0/x"
    form = {"key": name, "policy": "eyJ...", "x-amz-signature": "ab12"}
    good = {"object": name, "url": "https://store/bucket", "fields": form}
    checked(upload=None)
    checked(upload=good)
    for bad in (
        {"object": name, "url": "https://store/bucket"},
        {**good, "url": "file:///etc/passwd"},
        {**good, "more": "y"},
        {**good, "object": ""},
        {**good, "url": "https://s/" + "x" * 9000},
        {**good, "fields": {**form, "key": "p/uploads/r/1/1/x"}},  # a form for another object
        {**good, "fields": {**form, 'x"; filename="y': "z"}},  # a name that would break the form
        {**good, "fields": {**form, "policy": "a\r\n--boundary"}},
        {**good, "fields": {**form, "policy": 7}},
        {**good, "fields": {**form, **{f"f{i}": "v" for i in range(20)}}},
        {**good, "fields": "key=x"},
        "https://s/x",
    ):
        with pytest.raises(BadArguments):
            checked(upload=bad)


def test_a_reader_without_a_store_refuses_a_pointer(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = server.client()
        blobs.write_pointer(client, "ct:run:r:model:0", Pointer("p/x", 3, b"\0" * 32))
        with pytest.raises(blobs.BlobError, match="object store"):
            blobs.read(client, "ct:run:r:model:0")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def trusted(seaweed: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    server = RedisServer(tmp_path / "redis").start()
    store = Store(server.client())
    prefix = f"t{uuid.uuid4().hex[:8]}"  # the store outlives one test: each writes its own prefix
    store.create_run("r", RunConfig(blob_store=f"s3://{BUCKET}/{prefix}"), b"version zero")
    yield store
    server.stop()


def test_a_volunteer_reads_a_version_by_its_url_and_writes_only_its_slot(trusted, seaweed):
    pointer = blobs.read_pointer(trusted.redis, keys.model("r", 0))
    assert pointer is not None and pointer.url is not None
    assert UrlReader().fetch(pointer, "k", None) == b"version zero"
    slot = trusted.upload_slot("r", 1, 0)
    assert slot is not None and slot["object"].startswith(_prefix(trusted) + "/uploads/r/1/0/")
    checked(upload=slot)  # what the job message carries passes the volunteer's checks
    assert send_to_slot(slot, b"delta") == (5, hashlib.sha256(b"delta").digest())
    assert seaweed.client().get_object(Bucket=BUCKET, Key=slot["object"])["Body"].read() == b"delta"
    elsewhere = slot["object"].replace("/uploads/r/1/0/", "/uploads/r/1/1/")
    with pytest.raises(ObjectStoreError, match="refused"):  # the signed policy names the object
        send_to_slot({**slot, "fields": {**slot["fields"], "key": elsewhere}}, b"delta")
    assert seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix=elsewhere).get("KeyCount") == 0
    tampered = Pointer(pointer.object, pointer.size, hashlib.sha256(b"other").digest(), pointer.url)
    with pytest.raises(ObjectMismatch, match="sha256"):
        UrlReader().fetch(tampered, "k", None)


def test_urls_about_to_expire_are_signed_again_when_work_is_posted(trusted):
    key = keys.model("r", 0)
    old = blobs.read_pointer(trusted.redis, key)
    assert old is not None
    blobs.write_pointer(
        trusted.redis, key, Pointer(old.object, old.size, old.sha256, old.url, time.time() + 60)
    )
    trusted.renew_urls("r", 0)
    renewed = blobs.read_pointer(trusted.redis, key)
    assert renewed is not None and renewed.expires > time.time() + 6 * 24 * 3600
    assert UrlReader().fetch(renewed, key, None) == b"version zero"
    trusted.renew_urls("r", 0)
    assert blobs.read_pointer(trusted.redis, key) == renewed, "a URL with days left is kept"


def test_objects_no_pointer_names_are_swept_and_named_ones_kept(trusted, seaweed):
    store = trusted.objects("r")
    assert store is not None
    orphan = store.put("r", b"an old strategy state", readable=False)
    slot = trusted.upload_slot("r", 1, 0)
    assert slot is not None
    send_to_slot(slot, b"an old upload")
    kept = blobs.read_pointer(trusted.redis, keys.model("r", 0))
    assert kept is not None
    names = {item["Key"] for item in _listed(seaweed, trusted)}
    assert {orphan.object, slot["object"], kept.object} <= names
    assert store.sweep("r", [kept.object], blobs_older=3600, uploads_older=3600) == 0, "young ones stay"
    assert store.sweep("r", [kept.object], blobs_older=-1, uploads_older=-1) == 2
    left = {item["Key"] for item in _listed(seaweed, trusted)}
    assert kept.object in left and orphan.object not in left and slot["object"] not in left
    assert trusted.model_blob("r", 0) == b"version zero"


def _prefix(trusted: Store) -> str:
    store = trusted.objects("r")
    assert store is not None
    return store.location.prefix


def _listed(seaweed: SeaweedServer, trusted: Store) -> list[dict]:
    return seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix=_prefix(trusted) + "/")["Contents"]
