"""Some tensors of a message read from its chunks in turn: memory for those tensors, not the message.

A slice of a sliced run's merge (``coordinator.merging.split``) needs its own
tensors of the base version and of the strategy state, a fraction of each
message. ``loads_some`` walks the message's tensor maps over the chunks as
they come, copies out the payloads of the tensors it was asked for and skips
the others' unread, so it holds one chunk plus what it returns. It reads
``none`` tensors only (the codec of every trusted model and state blob);
anything else is a WireFormatError, and the caller reads the whole message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .errors import WireFormatError
from .reader import Reader
from .types import TensorDict
from .wire import _ITEMSIZE, DTYPES, FORMAT_VERSION

_MAX_NAME = 1024
_MAX_NDIM = 32


class _Chunked(Reader):
    """``Reader`` over a message that arrives as chunks: bytes are taken or skipped as they come."""

    def __init__(self, chunks: Iterator[bytes], total: int) -> None:
        super().__init__(memoryview(b""))
        self.chunks, self.end = chunks, total
        self.chunk, self.offset = memoryview(b""), 0  # the chunk in hand, and how far it is read

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > self.end:
            raise WireFormatError(f"truncated message: {what} needs {n} bytes at offset {self.pos}")
        if self.offset + n <= self.chunk.nbytes:  # within the chunk in hand: a view of it
            piece = self.chunk[self.offset : self.offset + n]
            self.offset += n
            self.pos += n
            return piece
        return memoryview(self.copy(n))

    def copy(self, n: int) -> bytearray:
        """The next ``n`` bytes in a buffer of their own."""
        if self.pos + n > self.end:
            raise WireFormatError(f"truncated message: a payload of {n} bytes at offset {self.pos}")
        out = bytearray(n)
        self._pass(n, memoryview(out))
        return out

    def skip(self, n: int) -> None:
        if self.pos + n > self.end:
            raise WireFormatError(f"truncated message: a payload of {n} bytes at offset {self.pos}")
        self._pass(n, None)

    def byte(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def key(self) -> str:
        return self.str_(64, "key")

    def _pass(self, n: int, out: memoryview | None) -> None:
        """Move on ``n`` bytes across chunks, copying them into ``out`` if given."""
        done = 0
        while done < n:
            if self.offset == self.chunk.nbytes:
                self.chunk, self.offset = memoryview(next(self.chunks, b"")), 0
                if not self.chunk.nbytes:
                    raise WireFormatError(f"the message's chunks end at offset {self.pos + done}")
            step = min(n - done, self.chunk.nbytes - self.offset)
            if out is not None:
                out[done : done + step] = self.chunk[self.offset : self.offset + step]
            self.offset += step
            done += step
        self.pos += n


def loads_some(chunks: Iterator[bytes], total: int, keep: Callable[[str], bool]) -> TensorDict:
    """The tensors whose name ``keep`` accepts of a message of ``total`` bytes.

    Each is a copy that owns its memory, in the message's order. WireFormatError
    for a malformed message, or one whose tensors are not all ``none``.
    """
    r = _Chunked(chunks, total)
    if r.map_header() != 3:
        raise WireFormatError("message must be a map of exactly 3 entries: v, tensors, meta")
    r.expect_key("v")
    if r.int_() != FORMAT_VERSION:
        raise WireFormatError(f"this reader knows format version {FORMAT_VERSION} only")
    r.expect_key("tensors")
    out: TensorDict = {}
    for _ in range(r.array_header()):
        header: dict = {}
        for _ in range(r.map_header()):
            key = r.key()
            if key == "name":
                header[key] = r.str_(_MAX_NAME, "tensor name")
            elif key == "codec":
                header[key] = r.str_(64, "codec name")
                if header[key] != "none":
                    raise WireFormatError(f"tensor codec {header[key][:20]!r}: only none is read in part")
            elif key == "dtype":
                header[key] = r.int_("dtype code")
            elif key == "shape":
                header[key] = [r.int_("dimension") for _ in range(r.array_header())]
            else:
                _field(r, key, header, keep, out)
    return out


def _field(r: _Chunked, key: str, header: dict, keep: Callable[[str], bool], out: TensorDict) -> None:
    """One ``bin`` field of a tensor map: its padding skipped, its payload kept if the tensor is wanted."""
    b = r.byte("payload")
    size = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(b)
    if size is None:
        raise WireFormatError(f"field {key!r} must be bin, found type byte 0x{b:02x}")
    n = int.from_bytes(r.take(size, "payload length"), "big")
    name = header.get("name")
    if key[:1] == "_" or not isinstance(name, str) or not keep(name):
        r.skip(n)
        return
    if header.get("codec") != "none" or key != "data" or len(header.get("shape", ())) > _MAX_NDIM:
        raise WireFormatError(f"tensor {name!r}: its header must come before its data")
    code, shape = header.get("dtype"), header["shape"]
    if not isinstance(code, int) or not 0 <= code < len(DTYPES):
        raise WireFormatError(f"tensor {name!r}: unknown dtype code {code}")
    count = 1
    for dim in shape:
        count *= dim
    if n != count * _ITEMSIZE[code] or name in out:
        raise WireFormatError(f"tensor {name!r}: {n} bytes for shape {tuple(shape)}, or named twice")
    buffer = r.copy(n)
    dtype = DTYPES[code]
    out[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
