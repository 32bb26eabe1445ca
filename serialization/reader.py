"""A small bounded msgpack reader for the fixed part of a message.

msgpack-python copies every ``bin`` into a new ``bytes``; this reader walks
the few header types the format uses and returns ``bin`` payloads as
memoryview slices of the input, which is what lets ``none`` tensors decode
without a copy. Every length is checked against the bytes present before it
is used.
"""

from __future__ import annotations

from typing import Any

from .errors import WireFormatError

__all__ = ["MAX_META_DEPTH", "Reader", "check_meta"]

MAX_META_DEPTH = 32
_TENSOR_KEYS = ("name", "codec", "dtype", "shape")
_MAX_KEY = 64
_MAX_CODEC = 64
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_SINT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_SCALARS = (type(None), bool, int, float, str, bytes)


class Reader:
    """Cursor over a memoryview of bytes; each method reads one msgpack item."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos, self.end = view, 0, view.nbytes

    def take(self, n: int, what: str) -> memoryview:
        """The next n bytes; WireFormatError if the message ends first."""
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise WireFormatError(
                f"truncated message: {what} needs {n} bytes at offset {start}, {self.end - start} left"
            )
        self.pos = stop
        return self.view[start:stop]

    def byte(self, what: str) -> int:
        """The next type byte."""
        pos = self.pos
        if pos >= self.end:
            raise WireFormatError(f"truncated message: {what} needs 1 byte at offset {pos}, 0 left")
        self.pos = pos + 1
        return self.view[pos]

    def _length(self, size: int, what: str) -> int:
        """A big-endian unsigned length of 1, 2 or 4 bytes."""
        return int.from_bytes(self.take(size, what), "big")

    def map_header(self) -> int:
        """Entries of the map that starts here."""
        b = self.byte("map")
        if 0x80 <= b <= 0x8F:
            return b & 0x0F
        if b in (0xDE, 0xDF):
            return self._length(2 if b == 0xDE else 4, "map length")
        raise WireFormatError(f"expected a map at offset {self.pos - 1}, found type byte 0x{b:02x}")

    def array_header(self) -> int:
        """Elements of the array that starts here (each needs at least one byte)."""
        b = self.byte("array")
        if 0x90 <= b <= 0x9F:
            n = b & 0x0F
        elif b in (0xDC, 0xDD):
            n = self._length(2 if b == 0xDC else 4, "array length")
        else:
            raise WireFormatError(f"expected an array at offset {self.pos - 1}, found 0x{b:02x}")
        if n > self.end - self.pos:
            raise WireFormatError(
                f"array of {n} elements at offset {self.pos} cannot fit "
                f"in the {self.end - self.pos} bytes left"
            )
        return n

    def str_(self, limit: int, what: str) -> str:
        """A UTF-8 string of at most ``limit`` bytes."""
        b = self.byte(what)
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
        elif b in _STR:
            n = self._length(_STR[b], what)
        else:
            raise WireFormatError(f"{what} must be a string, found type byte 0x{b:02x}")
        if n > limit:
            raise WireFormatError(f"{what} of {n} bytes is longer than {limit}")
        try:
            return str(self.take(n, what), "utf-8")
        except UnicodeDecodeError as e:
            raise WireFormatError(f"{what} is not valid UTF-8") from e

    def int_(self, what: str = "integer") -> int:
        """A msgpack integer of any width."""
        b = self.byte(what)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b in _UINT:
            return int.from_bytes(self.take(_UINT[b], what), "big")
        if b in _SINT:
            return int.from_bytes(self.take(_SINT[b], what), "big", signed=True)
        raise WireFormatError(f"{what} must be an integer, found type byte 0x{b:02x}")

    def bin_(self, what: str) -> memoryview:
        """A bin payload as a view of the input."""
        b = self.byte(what)
        size = _BIN.get(b)
        if size is None:
            raise WireFormatError(f"{what} must be bin, found type byte 0x{b:02x}")
        return self.take(int.from_bytes(self.take(size, what), "big"), what)

    def key(self) -> str:
        """A map key: a short string (the one-byte fixstr form read without the general path)."""
        pos, view = self.pos, self.view
        if pos < self.end and 0xA0 <= view[pos] <= 0xBF:
            stop = pos + 1 + (view[pos] & 0x1F)
            if stop <= self.end:
                try:
                    key = str(view[pos + 1 : stop], "utf-8")
                except UnicodeDecodeError as e:
                    raise WireFormatError("key is not valid UTF-8") from e
                self.pos = stop
                return key
        return self.str_(_MAX_KEY, "key")

    def expect_key(self, key: str) -> None:
        """The next item must be the string ``key``."""
        found = self.key()
        if found != key:
            raise WireFormatError(f"expected key {key!r}, found {found!r}")

    def tensor_map(self, max_name: int, max_ndim: int) -> tuple[dict[str, Any], dict[str, memoryview]]:
        """Header entries (name, codec, dtype, shape) and codec fields of one tensor map."""
        header: dict[str, Any] = {}
        fields: dict[str, memoryview] = {}
        for _ in range(self.map_header()):
            key = self.key()
            if key in header or key in fields:
                raise WireFormatError(f"duplicate tensor key {key!r}")
            if key == "name":
                header[key] = self.str_(max_name, "tensor name")
            elif key == "codec":
                header[key] = self.str_(_MAX_CODEC, "codec name")
            elif key == "dtype":
                header[key] = self.int_("dtype code")
            elif key == "shape":
                header[key] = self._shape(max_ndim)
            else:  # "_F" is F's padding; the what of an error is named only once it happens
                try:
                    payload = self.bin_("payload")
                except WireFormatError as e:
                    kind = "padding" if key[:1] == "_" else "field"
                    raise WireFormatError(f"{kind} {key!r}: {e}") from None
                if key[:1] != "_":
                    fields[key] = payload
        missing = [k for k in _TENSOR_KEYS if k not in header]
        if missing:
            raise WireFormatError(f"tensor map at offset {self.pos} lacks {', '.join(missing)}")
        return header, fields

    def _shape(self, max_ndim: int) -> list[int]:
        """A shape: at most max_ndim non-negative dimensions below 2**62."""
        ndim = self.array_header()
        if ndim > max_ndim:
            raise WireFormatError(f"shape has {ndim} dimensions; at most {max_ndim}")
        shape = []
        for _ in range(ndim):
            dim = self.int_("dimension")
            if dim < 0 or dim >= 1 << 62:
                raise WireFormatError(f"shape has a negative or absurd dimension {dim}")
            shape.append(dim)
        return shape

    def rest(self) -> memoryview:
        """Everything after the cursor."""
        return self.view[self.pos :]


def check_meta(meta: Any, depth: int = 0) -> None:
    """Meta must be a str-keyed map of plain msgpack values nested at most 32 deep."""
    if depth > MAX_META_DEPTH:
        raise WireFormatError(f"meta nests deeper than {MAX_META_DEPTH} levels")
    if depth == 0 and not isinstance(meta, dict):
        raise WireFormatError(f"meta must be a map, not {type(meta).__name__}")
    if isinstance(meta, dict):
        for key, value in meta.items():
            if not isinstance(key, str):
                raise WireFormatError(f"meta keys must be strings, found {type(key).__name__}")
            check_meta(value, depth + 1)
    elif isinstance(meta, (list, tuple)):
        for value in meta:
            check_meta(value, depth + 1)
    elif not isinstance(meta, _SCALARS):
        raise WireFormatError(f"meta value of type {type(meta).__name__} is not plain msgpack")
