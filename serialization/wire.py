"""The wire format: one msgpack map per message, tensor bytes as raw ``bin`` fields.

Byte layout (format version 2; every number little-endian inside ``bin``
payloads, msgpack's own big-endian framing around them)::

    map(3)                                   0x83
      "v"       -> 2                         positive fixint: FORMAT_VERSION
      "tensors" -> array(T) of tensor maps   in the caller's order
      "meta"    -> map                       str keys; nil, bool, int, float, str, bin,
                                             array, map values; nesting <= 32; <= 64 KiB
    tensor map (writers emit this order; readers accept any order, no duplicates):
      "name"  -> str                         state_dict key, <= 1024 UTF-8 bytes
      "codec" -> str                         canonical codec spec, e.g. "int8"; never a size
                                             policy (CODEC@N): the codec it picked for this tensor
      "dtype" -> int                         DTYPES index: 0 float32, 1 float16, 2 bfloat16,
                                             3 float64, 4 int64, 5 int32, 6 int16, 7 int8,
                                             8 uint8, 9 bool
      "shape" -> array of int >= 0           () for a 0-d tensor
      per codec field F, in the codec's order:
        "_F" -> bin8 of 0..63 zero bytes     padding: F's payload starts 64-byte aligned
        "F"  -> bin32 payload                field bytes, exact size fixed by codec + shape

Fields per codec (n = elements, k = round(F*n) >= 1, B = 256, I = 65536)::

    none        data: n * itemsize of dtype (raw tensor bytes)
    fp16, bf16  data: 2n (IEEE half / bfloat16)
    int8        q: n int8, scale: ceil(n/B) float32 (absmax/127 per block of B)
    topk:F      idx: k uint16 (index mod I), cnt: ceil(n/I) uint32 (entries per block of I),
                val: k float32
    topk:F+int8 idx, cnt as above, q: k int8, scale: ceil(k/B) float32 (int8 of the values)
    topk:F+int4, topk:F+int2
                data: ceil(n/4096) float32 scales, then a 12-bit offset per entry (two in
                3 bytes), then a 4- or 2-bit code per entry; k_b = round(F * block) >= 1
                per block of 4096 (codecs.BlockTopKCodec has the bit layout)

Meta comes last so a reader can hand the rest of the buffer to msgpack, which
also rejects trailing bytes. Changing any of these bytes means bumping
FORMAT_VERSION (tests/serialization/test_wire.py pins them). Version 2 has
version 1's bytes; it was bumped when messages began to be stored as chunk
lists or behind object-store pointers (``broker.blobs``), which a version-1
reader cannot read, so that mixing the two fails at once and by name.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from . import _buffers
from .codecs import Codec, NoneCodec, SizePolicy, parse_codec
from .errors import WireFormatError
from .reader import Reader, check_meta

__all__ = [
    "DEFAULT_LIMIT",
    "DTYPES",
    "FORMAT_VERSION",
    "MAX_META_BYTES",
    "Encoded",
    "Expected",
    "dumps",
    "dumps_stream",
    "dumps_visit",
    "encoded_size_bound",
    "loads",
]

FORMAT_VERSION = 2
# Trusted blobs (models, updates) of up to 4G float32 parameters; uploads pass their own bound.
DEFAULT_LIMIT = 1 << 34
MAX_META_BYTES = 64 << 10
MAX_NAME_BYTES = 1024
MAX_NDIM = 64
ALIGN = 64
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
_ITEMSIZE = tuple(torch.empty((), dtype=d).element_size() for d in DTYPES)
_TENSOR_OVERHEAD = 64  # map header, fixed keys, dtype, shape header: see encoded_size_bound
_FIELD_OVERHEAD = 80  # two keys of up to 7 bytes, bin8 + bin32 headers, up to 63 pad bytes


Visit = Callable[[str, Codec, dict[str, np.ndarray]], None]
# What a reader requires of each tensor: name -> (shape, dtype, canonical codec spec).
Expected = Mapping[str, tuple[Sequence[int], torch.dtype, str]]


def dumps(
    tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None, codec: str | Codec = "none"
) -> bytes:
    """Encode named tensors plus a small meta map into one self-describing message."""
    return dumps_visit(tensors, meta, codec, None)


def dumps_visit(
    tensors: Mapping[str, torch.Tensor], meta: Mapping | None, codec: str | Codec, visit: Visit | None
) -> bytes:
    """dumps, calling ``visit(name, codec, fields)`` once each tensor's fields are written.

    The field arrays are views of the message being built: read them inside
    ``visit`` (error feedback does), never keep them.
    """
    items, segments, total = _plan(tensors, meta, codec)
    buf, view = _buffers.allocate(total)
    out = view.data  # a memoryview: header bytes go in by slice assignment
    fields: dict[str, np.ndarray] = {}
    pos = 0
    for seg in segments:
        if type(seg) is bytes:  # header bytes, copied in place
            out[pos : pos + len(seg)] = seg
            pos += len(seg)
            continue
        index, field, size, last = seg
        fields[field] = view[pos : pos + size]
        pos += size
        if last:  # every field of this tensor has its place: write it once, straight into the message
            name, flat, used, _ = items[index]
            used.encode_into(flat, fields)
            if visit is not None:
                visit(name, used, fields)
            fields = {}
    del view, out, fields
    return _buffers.finish(buf)


@dataclass(frozen=True)
class Encoded:
    """A message not gathered into one buffer: its size, and its bytes as pieces in order.

    ``pieces`` can be read once. A large float tensor sent uncompressed is a
    view of the tensor itself, so the tensors must not change until it is read.
    """

    size: int
    pieces: Iterator[memoryview]

    def gather(self) -> bytes:
        """The whole message in one buffer (what ``dumps`` returns)."""
        buf, view = _buffers.allocate(self.size)
        out, pos = view.data, 0
        for piece in self.pieces:
            if pos + piece.nbytes > self.size:
                raise RuntimeError(f"an encoded message of {self.size} bytes gave more")
            out[pos : pos + piece.nbytes] = piece
            pos += piece.nbytes
        if pos != self.size:
            raise RuntimeError(f"an encoded message of {self.size} bytes gave {pos}")
        del view, out
        return _buffers.finish(buf)


def dumps_stream(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping | None = None,
    codec: str | Codec = "none",
    visit: Visit | None = None,
) -> Encoded:
    """``dumps_visit`` one tensor at a time: the same bytes, never more than one encoded tensor held.

    Each tensor is encoded when its first field is read (``visit`` is called
    then, with views that are valid until the next piece is read); a float
    tensor sent as ``none`` is not copied at all. Writers (``broker.blobs``)
    cut the pieces into chunks, so a model is sent without a second copy of it.
    """
    items, segments, total = _plan(tensors, meta, codec)
    return Encoded(total, _pieces(items, segments, visit))


def _plan(
    tensors: Mapping[str, torch.Tensor], meta: Mapping | None, codec: str | Codec
) -> tuple[list, list, int]:
    """Each tensor checked with its codec, the message's segments in order, and its total size."""
    _check_host()
    chosen = parse_codec(codec) if isinstance(codec, str) else codec
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, not {type(tensors).__name__}")
    items = [_prepare(name, t, chosen) for name, t in tensors.items()]
    segments, total = _layout(items, _pack_meta(meta))
    return items, segments, total


def _pieces(items: list, segments: list, visit: Visit | None) -> Iterator[memoryview]:
    """The message's bytes: header segments as they are, each tensor's fields as it is encoded."""
    current, fields = -1, {}
    for seg in segments:
        if isinstance(seg, bytes):
            yield memoryview(seg)
            continue
        index, field, _, _ = seg
        if index != current:
            current, fields = index, _encode_one(items[index], visit)
        yield fields[field].data.cast("B")


def _encode_one(item: tuple, visit: Visit | None) -> dict[str, np.ndarray]:
    """One tensor's fields: its own bytes for ``none``, else encoded into a buffer of their size."""
    name, flat, used, _ = item
    sizes = used.field_sizes(flat.numel(), flat.element_size())
    if isinstance(used, NoneCodec):
        fields = {"data": flat.view(torch.uint8).numpy()}
    else:
        scratch = np.empty(sum(sizes.values()), np.uint8)
        fields, pos = {}, 0
        for field, size in sizes.items():
            fields[field] = scratch[pos : pos + size]
            pos += size
        used.encode_into(flat, fields)
    if visit is not None:
        visit(name, used, fields)
    return fields


def loads(
    data: bytes | bytearray | memoryview,
    limit: int = DEFAULT_LIMIT,
    *,
    max_decoded: int | None = None,
    expect: Expected | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode a message; raises WireFormatError (only) on anything malformed.

    ``limit`` caps the payload's length; ``max_decoded`` caps the bytes of the
    returned tensors, checked before each allocation (default: the larger of
    ``limit`` and DEFAULT_LIMIT, since lossy codecs expand 4-130x). ``expect``
    (name -> (shape, dtype, codec spec)) makes every tensor header match it,
    and every expected name appear, before anything is allocated: an upload
    cannot make the reader allocate more than the model it claims to update.
    Tensors sent as ``none`` are read-only views of ``data`` where it is aligned
    (clone before modifying them in place, and before reusing a ``data`` buffer
    while they live); every other tensor owns its memory. All tensors are on the
    CPU in their declared dtype.
    """
    try:
        budget = max(limit, DEFAULT_LIMIT) if max_decoded is None else max_decoded
        return _loads(data, limit, budget, expect)
    except WireFormatError:
        raise
    except Exception as e:  # the contract: nothing else escapes
        raise WireFormatError(f"malformed payload ({type(e).__name__}: {e})") from e


def encoded_size_bound(
    shapes: Mapping[str, Sequence[int] | tuple[Sequence[int], torch.dtype]], codec: str | Codec
) -> int:
    """Most bytes dumps can produce for tensors of these shapes (float32 unless a dtype is given)."""
    chosen = parse_codec(codec) if isinstance(codec, str) else codec
    total = 32 + MAX_META_BYTES
    for name, spec in shapes.items():
        shape, dtype = _shape_and_dtype(spec)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        used = chosen.for_tensor(n, dtype.is_floating_point)
        sizes = used.field_sizes(n, _ITEMSIZE[_CODE[dtype]])
        total += (
            _TENSOR_OVERHEAD
            + len(name.encode())
            + len(used.name)
            + 9 * len(shape)
            + sum(_FIELD_OVERHEAD + size for size in sizes.values())
        )
    return total


def _loads(
    data: bytes | bytearray | memoryview, limit: int, max_decoded: int, expect: Expected | None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The body of loads; any exception it lets out is translated there."""
    _check_host()
    try:
        view = memoryview(data).cast("B")
    except TypeError as e:
        raise WireFormatError(f"payload must be bytes-like, not {type(data).__name__}") from e
    if view.nbytes > limit:
        raise WireFormatError(f"payload of {view.nbytes} bytes exceeds the limit of {limit} bytes")
    r = Reader(view)
    if r.map_header() != 3:
        raise WireFormatError("message must be a map of exactly 3 entries: v, tensors, meta")
    r.expect_key("v")
    version = r.int_()
    if version != FORMAT_VERSION:
        raise WireFormatError(f"unsupported format version {version}; this reader knows {FORMAT_VERSION}")
    r.expect_key("tensors")
    count = r.array_header()
    parsed = []
    budget, arena_size = max_decoded, 0
    if expect is not None and count != len(expect):
        raise WireFormatError(f"message has {count} tensors, expected {len(expect)}")
    for _ in range(count):
        entry = _read_tensor(r)
        if expect is not None:
            _check_expected(entry, expect)
        budget -= entry[3] * _ITEMSIZE[entry[2]]
        if budget < 0:
            raise WireFormatError(
                f"tensor {entry[0]!r} of shape {tuple(entry[4])} exceeds the "
                f"decode limit of {max_decoded} bytes"
            )
        arena_size += _arena_need(entry)
        parsed.append(entry)
    r.expect_key("meta")
    meta = _read_meta(r.rest())
    return _decode_all(parsed, np.empty(arena_size, np.float32)), meta


def _read_tensor(r: Reader) -> tuple:
    """Parse and check one tensor map: (name, codec, dtype code, n, shape, fields)."""
    header, fields = r.tensor_map(MAX_NAME_BYTES, MAX_NDIM)
    name = header["name"]
    try:
        codec = parse_codec(header["codec"])
    except WireFormatError as e:
        raise type(e)(f"tensor {name!r}: {e}") from None
    if isinstance(codec, SizePolicy):
        raise WireFormatError(f"tensor {name!r}: {codec.name} is a size policy, not a tensor codec")
    code, shape = header["dtype"], header["shape"]
    if not 0 <= code < len(DTYPES):
        raise WireFormatError(f"tensor {name!r}: unknown dtype code {code}")
    if codec.lossy and not DTYPES[code].is_floating_point:
        raise WireFormatError(f"tensor {name!r}: lossy codec {codec.name} on dtype {DTYPES[code]}")
    n = 1
    for dim in shape:
        n *= dim
    expected = codec.field_sizes(n, _ITEMSIZE[code])
    if expected.keys() != fields.keys():
        raise WireFormatError(
            f"tensor {name!r}: codec {codec.name} needs fields {sorted(expected)}, got {sorted(fields)}"
        )
    for field, size in expected.items():
        if fields[field].nbytes != size:
            raise WireFormatError(
                f"tensor {name!r}: field {field!r} has {fields[field].nbytes} "
                f"bytes, shape {tuple(shape)} with {codec.name} needs {size}"
            )
    return name, codec, code, n, shape, fields


def _check_expected(entry: tuple, expect: Expected) -> None:
    """The tensor header must be one the reader expects: name, shape, dtype and codec."""
    name, codec, code, _, shape, _ = entry
    if name not in expect:
        raise WireFormatError(f"unexpected tensor {str(name)[:60]!r}")
    want_shape, want_dtype, want_codec = expect[name]
    if tuple(shape) != tuple(want_shape):
        raise WireFormatError(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(want_shape)}")
    if DTYPES[code] != want_dtype:
        raise WireFormatError(f"tensor {name!r} has dtype {DTYPES[code]}, expected {want_dtype}")
    if codec.name != want_codec:
        raise WireFormatError(f"tensor {name!r} is encoded with {codec.name}, expected {want_codec}")


def _arena_need(entry: tuple) -> int:
    """float32 elements a tensor decodes into from the shared arena (64-byte rounded)."""
    _, codec, code, n, _, _ = entry
    return -(-n // 16) * 16 if codec.lossy and code == 0 else 0


def _decode_all(parsed: list, arena: np.ndarray) -> dict[str, torch.Tensor]:
    """Decode checked tensors; lossy float32 ones into one huge-page arena (one allocation)."""
    tensors: dict[str, torch.Tensor] = {}
    pos = 0
    for entry in parsed:
        name, codec, code, n, shape, fields = entry
        if name in tensors:
            raise WireFormatError(f"duplicate tensor name {name!r}")
        need = _arena_need(entry)
        out = arena[pos : pos + n] if need else None
        pos += need
        flat = codec.decode(fields, n, DTYPES[code], out)
        if code == _CODE[torch.bool] and n and int(flat.view(torch.uint8).max()) > 1:
            raise WireFormatError(f"tensor {name!r}: bool bytes other than 0 and 1")
        tensors[name] = flat if len(shape) == 1 else flat.view(shape)
    return tensors


def _read_meta(rest: memoryview) -> dict:
    """Unpack the trailing meta map with msgpack, bounded, and check its shape."""
    if rest.nbytes > MAX_META_BYTES:
        raise WireFormatError(f"meta of {rest.nbytes} bytes exceeds {MAX_META_BYTES} bytes")
    try:
        meta = msgpack.unpackb(
            rest,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_META_BYTES,
            max_bin_len=MAX_META_BYTES,
            max_array_len=MAX_META_BYTES,
            max_map_len=MAX_META_BYTES,
            max_ext_len=0,
        )
    except msgpack.ExtraData as e:
        raise WireFormatError(f"{len(e.extra)} trailing bytes after the message") from None
    except Exception as e:  # msgpack raises several types
        raise WireFormatError(f"malformed meta ({type(e).__name__}: {e})") from e
    check_meta(meta)
    return meta


def _pack_meta(meta: Mapping | None) -> bytes:
    """Pack the meta map after checking it is small, plain and shallow."""
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, not {type(meta).__name__}")
    try:
        check_meta(dict(meta))
        packed = msgpack.packb(dict(meta), use_bin_type=True, strict_types=False)
    except WireFormatError as e:
        raise ValueError(f"meta cannot go on the wire: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"meta cannot go on the wire: {e}") from e
    if len(packed) > MAX_META_BYTES:
        raise ValueError(f"meta packs to {len(packed)} bytes; the limit is {MAX_META_BYTES}")
    return packed


def _prepare(name: str, tensor: torch.Tensor, codec: Codec) -> tuple[str, torch.Tensor, Codec, torch.Size]:
    """Check one tensor and pick its codec (``none`` for non-float tensors; a size policy's choice)."""
    if not isinstance(name, str) or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name!r:.80} must be a str of at most {MAX_NAME_BYTES} bytes")
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise TypeError(f"tensor {name!r} must be a dense torch.Tensor, not {type(tensor).__name__}")
    if tensor.dtype not in _CODE:
        raise ValueError(
            f"tensor {name!r} has dtype {tensor.dtype}; the wire carries {', '.join(str(d) for d in DTYPES)}"
        )
    flat = tensor.detach()
    if not flat.is_cpu:
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    flat = flat.view(-1)
    used = codec.for_tensor(flat.numel(), flat.is_floating_point())
    return name, flat, used, tensor.shape


def _layout(items: list, meta_bytes: bytes) -> tuple[list, int]:
    """Header bytes and (tensor index, field, size, last field?) slots in message order, and the total."""
    segments: list = []
    head = b"\x83" + _HEAD + _array_header(len(items))
    offset = 0
    for index, (name, flat, codec, shape) in enumerate(items):
        sizes = codec.field_sizes(flat.numel(), flat.element_size())
        # One packb for the fixed entries: an array of 8 is a 1-byte header, then the items as a
        # map holds them (name, codec, dtype, shape, in that order).
        entries = ["name", name, "codec", codec.name, "dtype", _CODE[flat.dtype], "shape", list(shape)]
        head += bytes((0x80 | (4 + 2 * len(sizes)),)) + msgpack.packb(entries, use_bin_type=True)[1:]
        last = len(sizes) - 1
        for i, (field, size) in enumerate(sizes.items()):
            pad_key, key = _field_keys(field)
            pad = -(offset + len(head) + len(pad_key) + 2 + len(key) + 5) % ALIGN
            head += pad_key + _PADS[pad] + key + b"\xc6" + size.to_bytes(4, "big")
            segments += [head, (index, field, size, i == last)]
            offset += len(head) + size
            head = b""
    head += _P("meta") + meta_bytes
    segments.append(head)
    return segments, offset + len(head)


def _field_keys(field: str) -> tuple[bytes, bytes]:
    """The packed keys of a field's padding and payload (``_F``, ``F``), memoized."""
    keys = _FIELD_KEYS.get(field)
    if keys is None:
        keys = _FIELD_KEYS[field] = (_P("_" + field), _P(field))
    return keys


def _array_header(n: int) -> bytes:
    """msgpack array header for n elements."""
    if n < 16:
        return bytes((0x90 | n,))
    return b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n)


def _shape_and_dtype(spec: Sequence) -> tuple[tuple[int, ...], torch.dtype]:
    """Accept ``shape`` or ``(shape, dtype)`` in encoded_size_bound."""
    if len(spec) == 2 and isinstance(spec[1], torch.dtype):
        return tuple(int(d) for d in spec[0]), spec[1]
    return tuple(int(d) for d in spec), torch.float32


def _check_host() -> None:
    """The fast paths reinterpret memory as little-endian."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise WireFormatError("crowdtrain's wire format needs a little-endian host")


def _P(obj: object) -> bytes:
    """msgpack-pack one small value."""
    return msgpack.packb(obj, use_bin_type=True)


_HEAD = _P("v") + _P(FORMAT_VERSION) + _P("tensors")
_PADS = tuple(bytes((0xC4, n)) + bytes(n) for n in range(ALIGN))  # bin8 of n zero bytes
_FIELD_KEYS: dict[str, tuple[bytes, bytes]] = {}
