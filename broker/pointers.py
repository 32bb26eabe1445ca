"""What Redis holds for a blob kept in an object store, and the errors of reaching one.

Both sides use these: the trusted side writes pointers (``broker.objects``),
volunteers follow them (``broker.transfer``) with no store client at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import BrokerError

__all__ = ["MAX_POINTER", "ObjectMismatch", "ObjectStoreError", "Pointer"]

MAX_POINTER = 4096
_OBJECT = re.compile(r"[A-Za-z0-9._/-]{1,1024}")


class ObjectStoreError(BrokerError, ValueError):
    """The object store refused or could not be reached; the message says which and how to fix it."""


class ObjectMismatch(ObjectStoreError):
    """A pointer's object is missing, misplaced, over the reader's limit, or not what the pointer declares."""


@dataclass(frozen=True)
class Pointer:
    """What Redis holds for a blob kept as an object: its name, size, sha256 and (maybe) a GET URL."""

    object: str
    size: int
    sha256: bytes
    url: str | None = None
    expires: float = 0.0

    def pack(self) -> bytes:
        fields: dict[str, Any] = {"object": self.object, "size": self.size, "sha256": self.sha256}
        if self.url is not None:
            fields.update(url=self.url, expires=self.expires)
        return msgpack.packb(fields)

    @classmethod
    def unpack(cls, raw: bytes | bytearray, key: str) -> Pointer:
        """A pointer read from ``key``; ValueError unless every field has its type and size."""
        if len(raw) > MAX_POINTER:
            raise ValueError(f"{key}: a blob pointer of {len(raw)} bytes (at most {MAX_POINTER})")
        try:
            fields = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise ValueError(f"{key}: a blob pointer that is not msgpack ({e})") from None
        if not isinstance(fields, dict) or not {"object", "size", "sha256"} <= fields.keys() <= {
            "object",
            "size",
            "sha256",
            "url",
            "expires",
        }:
            raise ValueError(f"{key}: a blob pointer without its object, size and sha256")
        name, size, digest = fields["object"], fields["size"], fields["sha256"]
        url, expires = fields.get("url"), fields.get("expires", 0.0)
        ok = (
            isinstance(name, str)
            and _OBJECT.fullmatch(name) is not None
            and ".." not in name.split("/")
            and isinstance(size, int)
            and not isinstance(size, bool)
            and 0 <= size < 1 << 50
            and isinstance(digest, bytes)
            and len(digest) == 32
            and (url is None or (isinstance(url, str) and url.startswith(("http://", "https://"))))
            and isinstance(expires, (int, float))
        )
        if not ok:
            raise ValueError(f"{key}: a blob pointer with a malformed field")
        return cls(name, size, digest, url, float(expires))
