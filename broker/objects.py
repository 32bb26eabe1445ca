"""Blobs in an S3-compatible object store, reached through pointers kept in Redis.

With ``init --blob-store s3://bucket/prefix`` a run's models, updates,
residuals, strategy state and uploads live as objects; Redis keeps, under the
usual keys, only a pointer (``broker.blobs``): the object's name, size and
sha256, and for blobs volunteers read, a presigned GET URL. So ``commit.lua``
still publishes a version by renaming one small key.

Volunteers get no store credentials. They read models through the presigned
GET URLs in the pointers, and write each upload through a presigned POST that
their ``train_shard`` job carries: a form whose signed policy names one object
under ``uploads/RUN/ROUND/SHARD/`` and the most bytes it may hold (the run's
upload bound), so the store itself refuses a larger upload. Presigned URLs
and POST policies work with any S3-compatible store and need no identity
management there; the price is that a URL lives as long as it is signed for
(at most 7 days, SigV4's limit), so the coordinator signs a current version's
URL again when it posts work on it.
The trusted side never follows a URL from Redis: it signs its own, for an
object it checks lies where that key's blobs must lie, and verifies the size
and sha256 its pointer declares.

Object names::

    PREFIX/runs/RUN/blobs/UUID                 trusted blobs (models, updates, state)
    PREFIX/uploads/RUN/ROUND/SHARD/UUID        one job's upload slot

Objects nothing in Redis points to any more are swept (``ObjectStore.sweep``).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serialization import Encoded

from .errors import SettingsError
from .pointers import MAX_POINTER, ObjectMismatch, ObjectStoreError, Pointer
from .transfer import HTTP_TIMEOUT, Hashing, download

__all__ = [
    "MAX_POINTER",
    "PUBLIC_ENV",
    "S3_LARGEST_POST",
    "STORE_ENV",
    "URL_SECONDS",
    "Location",
    "ObjectMismatch",
    "ObjectStore",
    "ObjectStoreError",
    "Pointer",
]

STORE_ENV = "CROWDTRAIN_BLOB_STORE"
# The endpoint volunteers reach the store at, when it differs from the trusted side's
# (a compose network's "objects:8333" against a public address): presigned URLs name it.
PUBLIC_ENV = "CROWDTRAIN_BLOB_PUBLIC_URL"
URL_SECONDS = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
RENEW_BEFORE = 2 * 24 * 3600  # sign a pointer's URL again once it has less than this left
S3_LARGEST_POST = 5 << 30  # S3 takes one POST upload of at most 5 GiB: a slot's cap without a run bound
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


@dataclass(frozen=True)
class Location:
    """Where a deployment's blobs go: a bucket and a key prefix (``s3://bucket/prefix``)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Location:
        """The location of ``s3://bucket[/prefix]``; SettingsError for anything else."""
        scheme, _, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        dots = any(part in (".", "..") for part in prefix.split("/"))
        if (
            scheme != "s3"
            or not _BUCKET.fullmatch(bucket)
            or (prefix and not _PREFIX.fullmatch(prefix))
            or dots
        ):
            raise SettingsError(
                f"--blob-store {url!r}: use s3://BUCKET/PREFIX (a bucket of 3-63 lower-case letters, "
                "digits, '.' or '-'; a prefix of letters, digits, '.', '_', '-' and '/')"
            )
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def name(self, *parts: object) -> str:
        """An object name under this location's prefix."""
        return "/".join(str(p) for p in (self.prefix, *parts) if p != "")


class _HashingFile(Hashing):
    """``_Hashing`` with the file interface boto3 reads parts through (http.client would read 8 KiB)."""

    def __init__(self, data: bytes | bytearray | memoryview | Encoded) -> None:
        super().__init__(data)
        self._rest = iter(self)
        self._left = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        """The next bytes, up to ``size``."""
        parts: list[memoryview] = []
        got = 0
        while size < 0 or got < size:
            if not self._left.nbytes:
                piece = next(self._rest, None)
                if piece is None:
                    break
                self._left = piece
            take = self._left.nbytes if size < 0 else min(size - got, self._left.nbytes)
            parts.append(self._left[:take])
            got += take
            self._left = self._left[take:]
        return b"".join(parts)  # the one copy


class ObjectStore:
    """The trusted side's access to a run's bucket: writes, its own reads, presigning and sweeping.

    Credentials and endpoint are boto3's usual settings (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
    a profile...); ``CROWDTRAIN_BLOB_PUBLIC_URL`` is the endpoint presigned
    URLs name, if volunteers reach the store at another address.
    """

    def __init__(self, location: Location, env: Mapping[str, str] | None = None) -> None:
        import boto3
        from botocore.config import Config

        environ = os.environ if env is None else env
        endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None
        public = environ.get(PUBLIC_ENV) or endpoint
        # Path-style addressing for self-hosted stores (SeaweedFS, MinIO); AWS picks its own.
        style = "path" if endpoint else "auto"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": style},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=HTTP_TIMEOUT,
        )
        session = boto3.session.Session()
        region = environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION") or "us-east-1"
        self.location = location
        self.client = session.client("s3", endpoint_url=endpoint, config=config, region_name=region)
        self.signer = (
            self.client
            if public == endpoint
            else session.client("s3", endpoint_url=public, config=config, region_name=region)
        )

    # --- checks --------------------------------------------------------------
    def check(self) -> None:
        """Write, read and delete a small object; ObjectStoreError (one line, what to fix) if any fails."""
        name = self.location.name(".crowdtrain-check", uuid.uuid4().hex)
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=name, Body=b"crowdtrain")
            self.client.delete_object(Bucket=self.location.bucket, Key=name)
        except Exception as e:  # botocore raises many unrelated types: each becomes one line
            raise ObjectStoreError(
                f"blob store {self.location.url} cannot be written with these credentials: {_why(e)}"
            ) from None

    # --- blobs ---------------------------------------------------------------
    def put(self, run: str, data: bytes | bytearray | memoryview | Encoded, readable: bool = True) -> Pointer:
        """Store a trusted blob of ``run``; its pointer carries a GET URL if volunteers read it.

        An ``Encoded`` message is uploaded in parts as it is encoded, never gathered.
        """
        name = self.location.name("runs", run, "blobs", uuid.uuid4().hex)
        hashing = _HashingFile(data)
        try:
            self.client.upload_fileobj(hashing, self.location.bucket, name)
            digest = hashing.digest()
        except Exception as e:
            raise ObjectStoreError(f"blob store {self.location.url} refused a write: {_why(e)}") from None
        pointer = Pointer(name, hashing.size, digest)
        return self.signed(pointer) if readable else pointer

    def signed(self, pointer: Pointer) -> Pointer:
        """``pointer`` with a fresh presigned GET URL (valid URL_SECONDS)."""
        url = self._presign(self.signer, "get_object", pointer.object, URL_SECONDS)
        return Pointer(pointer.object, pointer.size, pointer.sha256, url, time.time() + URL_SECONDS)

    def fetch(self, pointer: Pointer, key: str, limit: int | None) -> bytearray:
        """The blob ``pointer`` names, read with this side's own URL; its object must lie where ``key``'s do.

        The pointer's own URL is never followed: a volunteer wrote upload pointers.
        """
        allowed = self.allowed_prefix(key)
        if allowed is None or not pointer.object.startswith(allowed):
            raise ObjectMismatch(f"{key} points outside {allowed or 'any place its blobs may lie'}")
        url = self._presign(self.client, "get_object", pointer.object, 3600)
        return download(url, pointer, key, limit)

    def allowed_prefix(self, key: str) -> str | None:
        """Where the object behind Redis key ``key`` must lie: its job's slot, or its run's blobs."""
        from . import keys

        origin = keys.upload_origin(key)
        if origin is not None:
            return self.location.name("uploads", *origin) + "/"
        run = keys.run_of(key)
        return self.location.name("runs", run, "blobs") + "/" if run is not None else None

    def upload_slot(self, run: str, number: int, shard: int, most: int) -> dict[str, Any]:
        """A fresh object for one job's upload and the presigned POST that may write it.

        The signed policy allows that one object name and 1 to ``most`` bytes
        (the run's upload bound), so a volunteer cannot park more in the store.
        """
        name = self.location.name("uploads", run, number, shard, uuid.uuid4().hex)
        try:
            form = self.signer.generate_presigned_post(
                self.location.bucket,
                name,
                Conditions=[["content-length-range", 1, most]],
                ExpiresIn=URL_SECONDS,
            )
        except Exception as e:  # no credentials, most often
            raise ObjectStoreError(f"blob store {self.location.url}: cannot sign a form: {_why(e)}") from None
        return {"object": name, "url": form["url"], "fields": dict(form["fields"])}

    def _presign(self, client: Any, operation: str, name: str, seconds: int) -> str:
        try:
            url: str = client.generate_presigned_url(
                operation, Params={"Bucket": self.location.bucket, "Key": name}, ExpiresIn=seconds
            )
        except Exception as e:  # no credentials, most often
            raise ObjectStoreError(f"blob store {self.location.url}: cannot sign a URL: {_why(e)}") from None
        return url

    # --- garbage -------------------------------------------------------------
    def sweep(self, run: str, keep: Iterable[str], blobs_older: float, uploads_older: float) -> int:
        """Delete ``run``'s blobs not in ``keep`` older than ``blobs_older`` seconds; uploads by age alone.

        Ages keep whatever is being written (a staged version, a fresh upload) out of reach.
        """
        kept = set(keep)
        now = time.time()
        doomed: list[str] = []
        for prefix, age in (
            (self.location.name("runs", run, "blobs") + "/", blobs_older),
            (self.location.name("uploads", run) + "/", uploads_older),
        ):
            for item in self._list(prefix):
                if item["Key"] not in kept and now - item["LastModified"].timestamp() > age:
                    doomed.append(item["Key"])
        self.delete(doomed)
        return len(doomed)

    def delete_run(self, run: str) -> None:
        """Delete every object of ``run`` (a run whose creation was undone)."""
        for prefix in (self.location.name("runs", run) + "/", self.location.name("uploads", run) + "/"):
            self.delete([item["Key"] for item in self._list(prefix)])

    def delete(self, names: Iterable[str]) -> None:
        batch = list(names)
        for start in range(0, len(batch), 1000):  # DeleteObjects takes at most 1,000 keys
            objects = [{"Key": name} for name in batch[start : start + 1000]]
            request = {"Objects": objects, "Quiet": True}
            self.client.delete_objects(Bucket=self.location.bucket, Delete=request)

    def _list(self, prefix: str) -> Iterable[dict[str, Any]]:
        listing = self.client.get_paginator("list_objects_v2")
        for page in listing.paginate(Bucket=self.location.bucket, Prefix=prefix):
            yield from page.get("Contents", [])


def _why(error: Exception) -> str:
    """One line for a boto3/botocore error: the store's error code and message, or the connection fault."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code, message = response["Error"].get("Code", ""), response["Error"].get("Message", "")
        return f"{code} {message}".strip() or type(error).__name__
    return " ".join(str(error).split())[:300] or type(error).__name__
