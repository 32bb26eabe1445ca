"""The volunteer's HTTP to an object store: presigned GETs and POSTs, retried, checked.

Volunteers hold no store credentials and import no store client: a pointer
carries a presigned GET URL, a job carries a presigned POST form (its upload
slot). Both go through one urllib3 pool whose ``Retry`` backs off on
connection faults and on 429/500/502/503/504, honouring ``Retry-After``, so a
store that blinks does not cost a trained shard. An upload's body is spooled
once (in memory up to ``SPOOL_MEMORY``, on disk beyond) so a retry can send it
again: a streamed ``Encoded`` message can be read only once.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError as TransportError

from serialization import Encoded

from .pointers import ObjectMismatch, ObjectStoreError, Pointer

__all__ = ["HTTP_TIMEOUT", "RETRY", "Hashing", "UrlReader", "download", "send_to_slot"]

HTTP_TIMEOUT = 60
READ_STEP = 8 << 20
SPOOL_MEMORY = 64 << 20  # an upload body above this is spooled to a temporary file for retries
# Five tries over about 15 s of backoff; a store's Retry-After is honoured instead.
RETRY = urllib3.Retry(
    total=5,
    connect=5,
    read=2,
    status=5,
    backoff_factor=0.5,
    backoff_max=10,
    status_forcelist=(429, 500, 502, 503, 504),
    allowed_methods=frozenset({"GET", "POST"}),  # a slot's POST names one object: sending it twice is safe
    respect_retry_after_header=True,
    raise_on_status=False,  # the last answer is returned, and said in one line below
)
_POOL = urllib3.PoolManager(retries=RETRY, timeout=urllib3.Timeout(connect=10, read=HTTP_TIMEOUT))


class UrlReader:
    """How a volunteer follows a pointer: a GET of its presigned URL, size and sha256 checked."""

    def fetch(self, pointer: Pointer, key: str, limit: int | None) -> bytearray:
        if pointer.url is None:
            raise ObjectStoreError(f"{key} is kept in the object store without a URL volunteers may read")
        return download(pointer.url, pointer, key, limit)


def send_to_slot(
    slot: Mapping[str, Any], data: bytes | bytearray | memoryview | Encoded
) -> tuple[int, bytes]:
    """Upload ``data`` through a job's slot (its presigned POST form); its size and sha256.

    The body is ``multipart/form-data``: the slot's signed fields, then the
    file, which S3 wants last. ObjectStoreError if refused (over the slot's
    size, say) or still failing after the retries.
    """
    hashing = Hashing(data)
    boundary = uuid.uuid4().hex  # 128 random bits: never inside the payload in practice
    fields = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in slot["fields"].items()
    )
    head = (
        f'{fields}--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as body:
        body.write(head)
        for piece in hashing:
            body.write(piece)
        body.write(tail)
        digest = hashing.digest()
        length = body.tell()
        body.seek(0)
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
        try:
            response = _POOL.request("POST", slot["url"], body=body, headers=headers)
        except TransportError as e:
            raise ObjectStoreError(f"the object store could not be reached for the upload ({e})") from None
    if response.status >= 300:
        raise ObjectStoreError(
            f"the object store refused the upload (HTTP {response.status} {response.reason}"
            f"{_s3_code(response.data[:4096])})"
        )
    return hashing.size, digest


def _s3_code(answer: bytes) -> str:
    """The S3 error code of a refusal (``EntityTooLarge``...), for the log line; empty if none."""
    found = re.search(rb"<Code>([A-Za-z]{1,64})</Code>", answer or b"")
    return f": {found.group(1).decode()}" if found else ""


class Hashing:
    """A blob's pieces, for http.client to send one by one, hashed (sha256) as they go."""

    def __init__(self, data: bytes | bytearray | memoryview | Encoded) -> None:
        if isinstance(data, Encoded):
            self.size, self._pieces = data.size, data.pieces
        else:
            view = memoryview(data).cast("B")
            self.size, self._pieces = view.nbytes, iter([view])
        self._sha = hashlib.sha256()
        self._sent = 0

    def __iter__(self) -> Iterator[memoryview]:
        for piece in self._pieces:
            self._sha.update(piece)
            self._sent += piece.nbytes
            yield piece

    def digest(self) -> bytes:
        if self._sent != self.size:
            raise ObjectStoreError(f"an upload of {self.size} bytes sent {self._sent}")
        return self._sha.digest()


def download(url: str, pointer: Pointer, key: str, limit: int | None) -> bytearray:
    """GET ``url`` into one buffer of the pointer's size: refused over ``limit``, short, long or altered."""
    if limit is not None and pointer.size > limit:
        raise ObjectMismatch(f"{key} declares {pointer.size} bytes, over the limit of {limit}")
    out = bytearray(pointer.size)
    view = memoryview(out)
    digest = hashlib.sha256()
    try:
        response = _POOL.request("GET", url, preload_content=False)
    except TransportError as e:
        raise ObjectStoreError(f"{key}: the object store could not be reached ({e})") from None
    try:
        if response.status == 404:  # never uploaded (or swept): that blob alone is refused
            raise ObjectMismatch(f"{key}: its object is not in the store")
        if response.status >= 300:
            raise ObjectStoreError(
                f"{key}: the object store answered HTTP {response.status} {response.reason}"
            )
        length = response.headers.get("Content-Length")
        if length is not None and int(length) != pointer.size:
            raise ObjectMismatch(f"{key}: its object holds {length} bytes, not {pointer.size}")
        position = 0
        while position < pointer.size:
            got = response.readinto(view[position : position + READ_STEP])
            if not got:
                break
            digest.update(view[position : position + got])
            position += got
        if position != pointer.size or response.read(1):
            raise ObjectMismatch(f"{key}: its object does not hold the {pointer.size} bytes declared")
    except (TransportError, OSError) as e:
        raise ObjectStoreError(f"{key}: the object store connection broke ({e})") from None
    finally:
        response.release_conn()
    if digest.digest() != pointer.sha256:
        raise ObjectMismatch(f"{key}: its object's sha256 is not the one its pointer declares")
    return out
