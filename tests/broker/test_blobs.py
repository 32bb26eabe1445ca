"""Chunked blobs on a real redis-server: any size, whole or nothing, bounded before reading."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from broker import blobs, keys
from broker.errors import SettingsError
from serialization import Encoded, WireFormatError, dumps, dumps_stream, loads, loads_some


@pytest.fixture
def client(redis_server, monkeypatch):
    monkeypatch.setenv(blobs.CHUNK_ENV, "1")  # 1 MiB chunks, so a few MiB make many
    return redis_server.client()


def test_a_blob_round_trips_as_a_list_of_bounded_chunks(client):
    data = bytes(range(256)) * (10 * 4096 + 3)  # 10 MiB and a bit: 11 chunks of at most 1 MiB
    assert blobs.write(client, "b", data) == len(data)
    assert client.type("b") == b"list"
    chunks = client.lrange("b", 1, -1)
    assert len(chunks) == 11 and max(len(c) for c in chunks) == blobs.MIB
    assert bytes(blobs.read(client, "b")) == data
    assert blobs.sizes(client, "b")[0] == len(data)
    assert blobs.sizes(client, "b")[1] >= len(data)


def test_an_empty_blob_and_a_missing_key_differ(client):
    blobs.write(client, "empty", b"")
    assert blobs.read(client, "empty") == bytearray()
    assert blobs.read(client, "missing") is None
    assert blobs.sizes(client, "missing") == (0, 0)


def test_rewriting_replaces_the_whole_blob_and_the_ttl_covers_every_chunk(client):
    blobs.write(client, "b", b"x" * (3 * blobs.MIB))
    blobs.write(client, "b", b"short", ttl=100)
    assert bytes(blobs.read(client, "b")) == b"short"
    assert 0 < client.ttl("b") <= 100
    blobs.write(client, "b", b"again")
    assert client.ttl("b") == -1, "a blob written without a ttl never expires"


def test_a_declared_size_over_the_limit_is_refused_before_reading(client):
    blobs.write(client, "b", b"y" * 1000)
    with pytest.raises(blobs.BlobError, match="over the limit of 999"):
        blobs.read(client, "b", limit=999)


@pytest.mark.parametrize(
    ("what", "store", "match"),
    [
        ("a plain string", lambda c: c.set("b", b"not chunks"), "not a chunk list"),
        ("no header", lambda c: c.rpush("b", b"data"), "header"),
        ("a wrong magic", lambda c: c.rpush("b", blobs.HEADER.pack(b"ctblob\x00\x09", 3), b"abc"), "magic"),
        ("chunks past the header", lambda c: c.rpush("b", blobs.HEADER.pack(blobs.MAGIC, 2), b"abc"), "more"),
        (
            "chunks short of it",
            lambda c: c.rpush("b", blobs.HEADER.pack(blobs.MAGIC, 9), b"abc"),
            "declares 9",
        ),
    ],
)
def test_a_malformed_blob_is_refused_with_one_error(client, what, store, match):
    store(client)
    with pytest.raises(blobs.BlobError, match=match):
        blobs.read(client, "b")


def test_a_lying_header_cannot_hide_a_huge_chunk_from_the_stored_size(client):
    client.rpush("b", blobs.HEADER.pack(blobs.MAGIC, 10), b"z" * (5 * blobs.MIB))
    declared, stored = blobs.sizes(client, "b")
    assert declared == 10
    assert stored > blobs.storage_bound(10), "the trusted side bounds the stored bytes, not the claim"


@pytest.mark.parametrize("value", ["0", "65", "ten", "-1"])
def test_a_bad_chunk_size_setting_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(blobs.CHUNK_ENV, value)
    with pytest.raises(SettingsError, match=blobs.CHUNK_ENV):
        blobs.chunk_bytes()


def test_sizing_an_upload_never_downloads_its_first_element(client):
    """A volunteer may put anything first; the trusted side's size check must not fetch it."""
    client.rpush("b", b"h" * (8 * blobs.MIB), b"data")
    sent_before = int(client.info("stats")["total_net_output_bytes"])
    declared, stored = blobs.sizes(client, "b")
    sent = int(client.info("stats")["total_net_output_bytes"]) - sent_before
    assert declared == 0 and stored > 8 * blobs.MIB
    assert sent < blobs.MIB, f"the size check moved {sent} bytes"


def test_a_streamed_message_is_written_in_chunks_and_appears_whole_or_not_at_all(client):
    weights = {"w": torch.randn(700, 1000), "b": torch.randn(3)}  # 2.8 MB: three 1 MiB chunks
    expected = dumps(weights, {"version": 1})
    blobs.write(client, "m", b"old", ttl=50)
    seen: list[bytes | None] = []

    def watched() -> Iterator[memoryview]:  # what a reader finds under "m" while the chunks go out
        for piece in dumps_stream(weights, {"version": 1}).pieces:
            seen.append(bytes(blobs.read(client, "m") or b""))
            yield piece

    assert blobs.write(client, "m", Encoded(len(expected), watched())) == len(expected)
    assert set(seen) == {b"old"}, "readers saw the old blob until the new one was whole"
    assert bytes(blobs.read(client, "m")) == expected
    assert client.ttl("m") == -1, "no TTL asked for: the partial key's TTL is gone"
    assert max(len(c) for c in client.lrange("m", 1, -1)) == blobs.MIB
    assert not client.exists(keys.partial("m"))

    def broken() -> Iterator[memoryview]:
        yield from list(dumps_stream(weights).pieces)[:3]
        raise OSError("the writer died")

    with pytest.raises(OSError):
        blobs.write(client, "m", Encoded(len(expected), broken()))
    assert bytes(blobs.read(client, "m")) == expected, "a failed write leaves the old blob"
    assert not client.exists(keys.partial("m")), "and no partial chunks"
    announced: list[str] = []
    blobs.write(client, "m2", dumps_stream(weights), ttl=60, also=lambda pipe: announced.append("yes"))
    assert announced == ["yes"] and 0 < client.ttl("m2") <= 60


def test_some_tensors_of_a_chunked_model_read_chunk_by_chunk_equal_the_whole_reads(client):
    """A slice's tensors (``serialization.loads_some``) across 1 MiB chunk boundaries, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    sizes = (300_000, 5, 700_000, 0, 250_000, 400_000)  # tensors straddle chunks, one is empty
    model = {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    model["steps"] = torch.arange(7, dtype=torch.int64)
    model["half"] = torch.randn(3, 5, generator=generator).to(torch.bfloat16)
    blobs.write(client, "m", dumps_stream(model, {"run": "r", "version": 3}))
    whole, _ = loads(blobs.read(client, "m"))
    for names in ({"t2", "t3", "half"}, {"t0", "steps", "t5"}, set(), set(model)):
        total, chunks = blobs.read_stream(client, "m")
        part = loads_some(chunks, total, names.__contains__)
        assert list(part) == [k for k in whole if k in names]
        for name, tensor in part.items():
            assert tensor.dtype == whole[name].dtype and tensor.shape == whole[name].shape
            assert (
                tensor.view(torch.uint8).numpy().tobytes() == whole[name].view(torch.uint8).numpy().tobytes()
            )
    assert blobs.read_stream(client, "missing") is None


def test_a_part_read_refuses_a_lossy_tensor_and_a_message_cut_short(client):
    blobs.write(client, "lossy", dumps({"w": torch.ones(5000)}, {}, codec="int8"))
    total, chunks = blobs.read_stream(client, "lossy")
    with pytest.raises(WireFormatError, match="only none"):
        loads_some(chunks, total, lambda name: True)
    message = dumps({"w": torch.ones(1000)}, {})
    with pytest.raises(WireFormatError):
        loads_some(iter([message[:-100]]), len(message), lambda name: True)
