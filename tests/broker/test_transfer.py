"""The volunteer's HTTP to the object store retries a store that blinks, and no more than it should.

The store here is a small real HTTP server that answers 503 (with
``Retry-After: 0``) to its first requests: the part under test is the client.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import urllib3

from broker import transfer
from broker.pointers import ObjectMismatch, ObjectStoreError, Pointer
from broker.transfer import RETRY, UrlReader, send_to_slot
from serialization import dumps_stream, loads


class FlakyStore:
    """Answers ``fail`` requests with 503 first, then serves ``blob`` (GET) or keeps the body (POST)."""

    def __init__(self, fail: int, blob: bytes = b"", missing: bool = False) -> None:
        self.fail, self.blob, self.missing = fail, blob, missing
        self.requests: list[str] = []
        self.bodies: list[bytes] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _flaky(self) -> bool:
                store.requests.append(self.command)
                if len(store.requests) <= store.fail:
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                return False

            def do_GET(self) -> None:
                if self._flaky():
                    return
                if store.missing:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(store.blob)))
                self.end_headers()
                self.wfile.write(store.blob)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self._flaky():
                    return
                store.bodies.append(body)
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bucket/object"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(monkeypatch) -> Iterator[type[FlakyStore]]:
    """Flaky stores to point the client at, with the client's backoff (0.5 s doubling) set to 0."""
    quick = transfer.RETRY.new(backoff_factor=0)
    monkeypatch.setattr(transfer, "_POOL", urllib3.PoolManager(retries=quick))
    made: list[FlakyStore] = []

    def make(*args: object, **kwargs: object) -> FlakyStore:
        made.append(FlakyStore(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make  # type: ignore[misc]
    for store in made:
        store.close()


def _slot(url: str) -> dict:
    return {"url": url, "fields": {"key": "uploads/r/1/0/x", "policy": "p"}, "object": "uploads/r/1/0/x"}


def test_an_upload_of_a_streamed_message_is_sent_whole_again_after_a_503(flaky):
    store = flaky(fail=2)
    delta = {"w": torch.arange(50_000, dtype=torch.float32)}
    encoded = dumps_stream(delta, {"samples": 3})  # readable once: the retry must not need it again
    size, digest = send_to_slot(_slot(store.url), encoded)
    assert store.requests == ["POST", "POST", "POST"]
    (body,) = store.bodies
    start = body.index(b"\r\n\r\n", body.index(b'name="file"')) + 4
    payload = body[start : start + size]
    assert hashlib.sha256(payload).digest() == digest
    assert torch.equal(loads(payload)[0]["w"], delta["w"])


def test_a_download_comes_through_a_store_that_blinks(flaky):
    blob = b"version zero" * 1000
    store = flaky(fail=3, blob=blob)
    pointer = Pointer("runs/r/blobs/x", len(blob), hashlib.sha256(blob).digest(), store.url)
    assert UrlReader().fetch(pointer, "k", None) == blob
    assert store.requests == ["GET"] * 4


def test_a_store_that_never_recovers_is_one_error_after_the_retries(flaky):
    store = flaky(fail=1000)
    with pytest.raises(ObjectStoreError, match="refused the upload \\(HTTP 503"):
        send_to_slot(_slot(store.url), b"delta")
    assert len(store.requests) == RETRY.total + 1
    pointer = Pointer("runs/r/blobs/x", 5, hashlib.sha256(b"delta").digest(), store.url)
    with pytest.raises(ObjectStoreError, match="HTTP 503"):
        UrlReader().fetch(pointer, "k", None)


def test_a_missing_object_is_refused_at_once_not_retried(flaky):
    store = flaky(fail=0, missing=True)
    pointer = Pointer("runs/r/blobs/x", 5, b"\0" * 32, store.url)
    with pytest.raises(ObjectMismatch, match="not in the store"):
        UrlReader().fetch(pointer, "k", None)
    assert store.requests == ["GET"]
