"""Blobs of any size in Redis: a list of chunks under one key.

One Redis value holds at most 512 MB, and a reader that GETs a whole model
holds it twice while it decodes. So every model, update, delta and strategy
state is a Redis list: a 16-byte header, then the payload cut into chunks of
``CROWDTRAIN_CHUNK_MIB`` (default 16, at most 64) MiB::

    LINDEX 0   b"ctblob\\x00\\x01" + total payload bytes (uint64 little-endian)
    LINDEX 1.. the payload, in order; every chunk but the last is full

A writer replaces the whole list in one MULTI/EXEC, so a reader sees the old
blob or the new one, never half; one key means one TTL, so the chunks expire
together, and RENAME/PERSIST in the coordinator's scripts move a blob whole.
A reader allocates the declared size once (after checking it against its
limit), then copies the chunks in one at a time: it holds the payload plus one
chunk. The header of an upload is the volunteer's claim: each chunk is checked
against what is left of it, and a blob whose chunks do not add up is refused.

A run with a blob store (``broker.objects``) keeps its blobs as objects: the
list then holds a pointer (magic ``ctblob\0\2``, one chunk: the object's
name, size and sha256), which a reader follows through the ``remote`` it
passes; a reader without one refuses it.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import redis

from serialization import Encoded

from . import keys
from .errors import BrokerError, SettingsError
from .pointers import MAX_POINTER, ObjectMismatch, Pointer

__all__ = [
    "CHUNK_ENV",
    "DEFAULT_CHUNK_MIB",
    "HEADER",
    "MAX_CHUNK_MIB",
    "BlobError",
    "Remote",
    "chunk_bytes",
    "queue_write",
    "read",
    "read_many",
    "read_pointer",
    "read_stream",
    "sizes",
    "sizes_many",
    "storage_bound",
    "stored_bytes",
    "write",
    "write_pointer",
]

CHUNK_ENV = "CROWDTRAIN_CHUNK_MIB"
DEFAULT_CHUNK_MIB = 16
MAX_CHUNK_MIB = 64
MAGIC = b"ctblob\x00\x01"
POINTER_MAGIC = b"ctblob\x00\x02"
PARTIAL_TTL = 3600
HEADER = struct.Struct("<8sQ")
MIB = 1 << 20
# The first element of a list, only if it is header-sized: sizing a volunteer's upload must
# not download a first element as large as Redis allows (its length is taken on the server).
_HEADER_ONLY = """
local head = redis.call('LINDEX', KEYS[1], 0)
if head and string.len(head) == tonumber(ARGV[1]) then return head end
return false
"""


class BlobError(BrokerError, ValueError):
    """A stored blob is not a well-formed chunk list, or is larger than the reader allows."""


class Remote(Protocol):
    """How a reader follows a pointer to the object store (``broker.objects``)."""

    def fetch(self, pointer: Pointer, key: str, limit: int | None) -> bytearray: ...


def chunk_bytes(env: Mapping[str, str] | None = None) -> int:
    """The chunk size writers use, from ``CROWDTRAIN_CHUNK_MIB`` (1 to 64 MiB)."""
    raw = (os.environ if env is None else env).get(CHUNK_ENV) or str(DEFAULT_CHUNK_MIB)
    try:
        mib = int(raw)
    except ValueError:
        mib = 0
    if not 1 <= mib <= MAX_CHUNK_MIB:
        raise SettingsError(
            f"{CHUNK_ENV} must be a whole number of MiB from 1 to {MAX_CHUNK_MIB}, not {raw!r}"
        )
    return mib * MIB


def write(
    client: redis.Redis,
    key: str,
    data: bytes | bytearray | memoryview | Encoded,
    ttl: int | None = None,
    also: Callable[[redis.client.Pipeline], object] | None = None,
) -> int:
    """Store ``data`` under ``key`` as a chunk list, replacing what was there; returns its bytes.

    With ``ttl`` the blob expires after that many seconds, else never; ``also``
    adds commands to the transaction that makes the blob visible (an
    announcement). The chunks are slices of ``data``: nothing is copied on
    this side. An ``Encoded`` message larger than a chunk is streamed: its
    chunks go to ``keys.partial(key)`` one at a time, and one MULTI/EXEC
    renames them into place, so neither side of the wire holds the message whole.
    """
    if isinstance(data, Encoded):
        if data.size > chunk_bytes():
            return _write_streamed(client, key, data, ttl, also)
        data = data.gather()
    pipe = client.pipeline(transaction=True)
    size = queue_write(pipe, key, data, ttl)
    if also is not None:
        also(pipe)
    pipe.execute()
    return size


def _write_streamed(
    client: redis.Redis,
    key: str,
    data: Encoded,
    ttl: int | None,
    also: Callable[[redis.client.Pipeline], object] | None,
) -> int:
    partial = keys.partial(key)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.delete(partial)
        pipe.rpush(partial, HEADER.pack(MAGIC, data.size))
        pipe.expire(partial, PARTIAL_TTL)  # a writer that dies leaves nothing for long
        pipe.execute()
        written = 0
        for chunk in _chunks_of(data.pieces, chunk_bytes()):
            client.rpush(partial, chunk)
            written += chunk.nbytes
        if written != data.size:
            raise BlobError(f"{key}: the message gave {written} bytes, not the {data.size} it declared")
        pipe = client.pipeline(transaction=True)
        pipe.rename(partial, key)
        if ttl is None:
            pipe.persist(key)
        else:
            pipe.expire(key, ttl)
        if also is not None:
            also(pipe)
        pipe.execute()
    except BaseException:
        with contextlib.suppress(redis.RedisError):
            client.delete(partial)
        raise
    return data.size


def _chunks_of(pieces: Iterable[memoryview], size: int) -> Iterator[memoryview]:
    """Full chunks of ``size`` bytes (the last one shorter): slices of large pieces, small ones gathered."""
    pending = bytearray(size)
    filled = 0
    for piece in pieces:
        view = piece.cast("B") if piece.format != "B" else piece
        start = 0
        while start < view.nbytes:
            if filled == 0 and view.nbytes - start >= size:  # a whole chunk of one piece: no copy
                yield view[start : start + size]
                start += size
                continue
            take = min(size - filled, view.nbytes - start)
            pending[filled : filled + take] = view[start : start + take]
            filled += take
            start += take
            if filled == size:
                yield memoryview(pending)
                pending, filled = bytearray(size), 0
    if filled:
        yield memoryview(pending)[:filled]


def write_pointer(
    client: redis.Redis,
    key: str,
    pointer: Pointer,
    ttl: int | None = None,
    also: Callable[[redis.client.Pipeline], object] | None = None,
) -> None:
    """Store a pointer to an object under ``key``, replacing what was there (``also``: as in ``write``)."""
    pipe = client.pipeline(transaction=True)
    queue_write(pipe, key, pointer.pack(), ttl, magic=POINTER_MAGIC)
    if also is not None:
        also(pipe)
    pipe.execute()


def queue_write(
    pipe: redis.client.Pipeline,
    key: str,
    data: bytes | bytearray | memoryview,
    ttl: int | None = None,
    magic: bytes = MAGIC,
) -> int:
    """Add ``write``'s commands to a transaction ``pipe`` (so more can go in the same MULTI/EXEC).

    With ``magic=POINTER_MAGIC``, ``data`` is a packed ``Pointer``.
    """
    view = memoryview(data).cast("B")
    size = chunk_bytes()
    pipe.delete(key)
    pipe.rpush(key, HEADER.pack(magic, view.nbytes))
    for chunk in _chunks_of([view], size):
        pipe.rpush(key, chunk)
    if ttl is not None:
        pipe.expire(key, ttl)
    return view.nbytes


def read(
    client: redis.Redis, key: str, limit: int | None = None, remote: Remote | None = None
) -> bytearray | None:
    """The payload under ``key``; None if there is no such key.

    Raises BlobError if the key holds anything but a well-formed chunk list,
    or declares more than ``limit`` bytes (checked before anything is allocated).
    A chunk list that goes while it is read (expired, pruned) is refused too.
    Nothing replaces a blob its reader may be reading: model versions and
    updates are written once, uploads are read only once moved out of their
    volunteer's reach, and strategy state and residuals are replaced only by
    the aggregator holding the round's claim, their only reader. The first
    element is read unbounded: call ``sizes`` first on anything a volunteer wrote.
    A pointer is followed through ``remote`` (BlobError without one).
    """
    try:
        head, count = _head(client, key)
    except redis.ResponseError as e:  # WRONGTYPE: a plain string or another type
        raise BlobError(f"{key} is not a chunk list ({e})") from None
    if head is None:
        return None
    magic, total = _header(head, key)
    if magic == POINTER_MAGIC:
        return _follow(_chunks(client, key, count, _pointer_size(total, key)), key, limit, remote)
    if limit is not None and total > limit:
        raise BlobError(f"{key} declares {total} bytes, over the limit of {limit}")
    return _chunks(client, key, count, total)


def read_stream(client: redis.Redis, key: str) -> tuple[int, Iterator[bytes]] | None:
    """(payload bytes, its chunks one at a time) of a blob kept in Redis; None for none or a pointer.

    For a trusted reader that wants a part of a blob it will not replace while
    it reads (a model version); the caller follows a pointer with ``read``.
    """
    head, count = _head(client, key)
    if head is None:
        return None
    magic, total = _header(head, key)
    if magic == POINTER_MAGIC:
        return None

    def chunks() -> Iterator[bytes]:
        for index in range(1, count):
            chunk = client.lindex(key, index)
            if chunk is None:
                raise BlobError(f"{key} changed while it was read (chunk {index} of {count - 1} is gone)")
            yield chunk

    return total, chunks()


def read_pointer(client: redis.Redis | redis.client.Pipeline, key: str) -> Pointer | None:
    """The pointer under ``key``; None if there is none (no key, or a blob kept in Redis)."""
    head = client.lindex(key, 0)
    if not isinstance(head, bytes) or len(head) != HEADER.size:
        return None
    magic, total = HEADER.unpack(head)
    if magic != POINTER_MAGIC:
        return None
    raw = client.lindex(key, 1) if total <= MAX_POINTER else None
    if not isinstance(raw, bytes) or len(raw) != total:
        return None
    try:
        return Pointer.unpack(raw, key)
    except ValueError:
        return None


def _chunks(client: redis.Redis, key: str, count: int, total: int) -> bytearray:
    """Chunks 1.. of ``key`` copied into one buffer of ``total`` bytes; BlobError unless they fill it."""
    out = bytearray(total)
    pos = 0
    for index in range(1, count):
        chunk = client.lindex(key, index)
        if chunk is None:
            raise BlobError(f"{key} changed while it was read (chunk {index} of {count - 1} is gone)")
        if len(chunk) > total - pos:
            raise BlobError(f"{key}: its chunks hold more than the {total} bytes its header declares")
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
        del chunk
    if pos != total:
        raise BlobError(f"{key}: its chunks hold {pos} bytes, its header declares {total}")
    return out


def sizes(client: redis.Redis, key: str) -> tuple[int, int]:
    """(declared, stored) bytes of ``key`` in one round trip; (0, 0) if there is no such key.

    ``declared`` is what the header says (0 if there is none); ``stored`` is
    Redis's MEMORY USAGE, at least the bytes really there whatever the type.
    The trusted side bounds a volunteer's upload by both before reading a
    chunk: the header is only the volunteer's word, and one chunk could be as
    large as Redis allows.
    """
    return sizes_many(client, [key])[0]


def sizes_many(client: redis.Redis, keys: Sequence[str]) -> list[tuple[int, int]]:
    """``sizes`` of each key, in one round trip."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    header = client.register_script(_HEADER_ONLY)
    for key in keys:
        stored_bytes(pipe, key)
        header(keys=[key], args=[HEADER.size], client=pipe)
    replies = pipe.execute(raise_on_error=False)
    out: list[tuple[int, int]] = []
    for key, stored, head in zip(keys, replies[0::2], replies[1::2], strict=True):
        if stored is None or isinstance(stored, Exception):
            out.append((0, 0))
            continue
        declared = 0
        if isinstance(head, bytes):
            try:
                declared = _header(head, key)[1]
            except BlobError:
                declared = 0
        out.append((declared, int(stored)))
    return out


def read_many(
    client: redis.Redis,
    keys: Sequence[str],
    limits: Sequence[int | None] | None = None,
    remote: Remote | None = None,
) -> list[bytearray | BlobError | None]:
    """``read`` of each key, in two round trips for blobs of one chunk (the usual upload).

    Each answer is the payload, None (no such key) or the BlobError that ``read``
    would raise: one malformed blob does not spoil the others.
    """
    if not keys:
        return []
    bounds = list(limits) if limits is not None else [None] * len(keys)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.lindex(key, 0)
        pipe.llen(key)
    replies = pipe.execute(raise_on_error=False)
    out: list[bytearray | BlobError | None] = [None] * len(keys)
    single: list[tuple[int, int, bool]] = []  # (index, declared size, a pointer?) of one-chunk blobs
    for index, (key, head, count) in enumerate(zip(keys, replies[0::2], replies[1::2], strict=True)):
        if isinstance(head, Exception) or isinstance(count, Exception):
            out[index] = BlobError(
                f"{key} is not a chunk list ({head if isinstance(head, Exception) else count})"
            )
            continue
        if head is None:
            continue
        try:
            magic, total = _header(head, key)
            limit = bounds[index]
            if magic == POINTER_MAGIC:
                total = _pointer_size(total, key)
            elif limit is not None and total > limit:
                raise BlobError(f"{key} declares {total} bytes, over the limit of {limit}")
            if int(count) == 2:
                single.append((index, total, magic == POINTER_MAGIC))
            else:
                out[index] = read(client, key, limit, remote)
        except BlobError as e:
            out[index] = e
    if single:
        pipe = client.pipeline(transaction=False)
        for index, _, _ in single:
            pipe.lindex(keys[index], 1)
        for (index, total, pointer), chunk in zip(single, pipe.execute(), strict=True):
            if chunk is None or len(chunk) != total:
                got = "nothing" if chunk is None else f"{len(chunk)} bytes"
                out[index] = BlobError(f"{keys[index]}: its chunk holds {got}, its header declares {total}")
            elif pointer:
                try:
                    out[index] = _follow(chunk, keys[index], bounds[index], remote)
                except BlobError as e:
                    out[index] = e
            else:
                out[index] = bytearray(chunk)
    return out


def stored_bytes(client: redis.Redis | redis.client.Pipeline, key: str) -> object:
    """Queue or run MEMORY USAGE of ``key`` (None if absent)."""
    return client.execute_command("MEMORY USAGE", key, "SAMPLES", "0")


def storage_bound(limit: int) -> int:
    """The most MEMORY USAGE a blob of ``limit`` payload bytes can show: the payload plus list overhead."""
    return limit + limit // 8 + 64 * 1024


def _head(client: redis.Redis, key: str) -> tuple[bytes | None, int]:
    """The header chunk and the list's length, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.lindex(key, 0)
    pipe.llen(key)
    head, count = pipe.execute()
    return head, int(count)


def _header(head: bytes, key: str) -> tuple[bytes, int]:
    """The header's magic (a blob or a pointer) and the size it declares; BlobError if it is neither."""
    if len(head) != HEADER.size:
        raise BlobError(f"{key} does not start with a {HEADER.size}-byte blob header")
    magic, total = HEADER.unpack(head)
    if magic not in (MAGIC, POINTER_MAGIC):
        raise BlobError(f"{key} does not start with the blob header (magic {magic!r})")
    return magic, int(total)


def _pointer_size(total: int, key: str) -> int:
    if total > MAX_POINTER:
        raise BlobError(f"{key} holds a pointer of {total} bytes (at most {MAX_POINTER})")
    return total


def _follow(raw: bytes | bytearray, key: str, limit: int | None, remote: Remote | None) -> bytearray:
    """The object a pointer names, through ``remote``; BlobError if it may not or does not match."""
    if remote is None:
        raise BlobError(f"{key} is kept in an object store, which this reader does not use")
    try:
        pointer = Pointer.unpack(raw, key)
        return remote.fetch(pointer, key, limit)
    except ObjectMismatch as e:
        raise BlobError(str(e)) from None
    except ValueError as e:  # a malformed pointer
        if isinstance(e, BrokerError) and not isinstance(e, BlobError):
            raise
        raise BlobError(str(e)) from None
