"""dumps against a plain reference writer, and which decoded tensors share memory with the payload.

The reference writer below builds a message the slow, obvious way (one
``msgpack.packb`` per item, each field encoded into its own array, everything
concatenated), as the format's docstring in ``serialization.wire`` describes
it. ``dumps`` writes every tensor once into one preallocated buffer; the two
must agree byte for byte for every codec.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from serialization import WireFormatError, dumps, dumps_stream, loads, parse_codec
from serialization.wire import ALIGN, DTYPES, FORMAT_VERSION

SPECS = (
    "none",
    "fp16",
    "bf16",
    "int8",
    "topk:0.1",
    "topk:0.1+int8",
    "topk:0.05+int4",
    "topk:0.05+int2",
    "topk:0.05+int2@300:int8",
    "int8@100:fp16",
)


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def reference_dumps(tensors: dict[str, torch.Tensor], meta: dict, spec: str) -> bytes:
    """The wire format written item by item, with no preallocation and no reuse."""
    chosen = parse_codec(spec)
    out = bytearray(b"\x83" + _pack("v") + _pack(FORMAT_VERSION) + _pack("tensors"))
    out += _pack([None] * len(tensors))[: -len(tensors)] if tensors else b"\x90"  # the array header
    for name, tensor in tensors.items():
        flat = tensor.detach().contiguous().reshape(-1)
        used = chosen.for_tensor(flat.numel(), tensor.is_floating_point())
        fields = used.encode(flat)
        out += bytes((0x80 | (4 + 2 * len(fields)),))
        out += _pack("name") + _pack(name) + _pack("codec") + _pack(used.name)
        out += _pack("dtype") + _pack(DTYPES.index(tensor.dtype)) + _pack("shape") + _pack(list(tensor.shape))
        for field, array in fields.items():
            pad_key, key = _pack("_" + field), _pack(field)
            pad = -(len(out) + len(pad_key) + 2 + len(key) + 5) % ALIGN
            out += pad_key + _pack(bytes(pad)) + key + b"\xc6" + len(array).to_bytes(4, "big")
            out += array.tobytes()
    return bytes(out + _pack("meta") + _pack(meta))


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every wire dtype, odd sizes (block tails), a 0-d, an empty and a non-contiguous tensor.

    About 140 KB as none, so a none message takes the uninitialised-bytes path of _buffers."""
    gen = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(129, 137, generator=gen),  # 17673 values: a tail in every block size
        "t": torch.randn(137, 129, generator=gen).t(),  # non-contiguous
        "h": torch.randn(257, generator=gen).half(),
        "bf": torch.randn(33, generator=gen).bfloat16(),
        "d": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "s": torch.tensor(2.5),
        "e": torch.empty(0, 4),
        "i64": torch.arange(11),
        "i32": torch.arange(-3, 4, dtype=torch.int32),
        "i16": torch.tensor([1, -2, 3], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.arange(250, 255, dtype=torch.uint8),
        "b": torch.tensor([True, False, True]),
        "ünï": torch.randn(3, generator=gen),
    }


@pytest.mark.parametrize("spec", SPECS)
def test_dumps_writes_the_reference_bytes_for_every_codec(spec):
    meta = {"round": 3, "note": "x" * 70}
    small = mixed_tensors()
    # Above 64 KiB (every codec, with the 1M-value tensor) dumps fills an uninitialised bytes
    # object, so every byte it leaves out would show: the memory a freed buffer of the same
    # size held (0xa5 bytes) is what the allocator is likely to hand out next.
    for tensors in (
        small,
        {"big": torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)), **small},
    ):
        expected = reference_dumps(tensors, meta, spec)
        junk = b"\xa5" * len(expected)
        del junk
        assert dumps(tensors, meta, spec) == expected
        assert dumps_stream(tensors, meta, spec).gather() == expected
    decoded, back = loads(expected)
    assert back == meta and list(decoded) == list(tensors)
    assert all(decoded[k].shape == v.shape and decoded[k].dtype == v.dtype for k, v in tensors.items())


@pytest.mark.parametrize("spec", SPECS)
def test_only_tensors_sent_as_none_share_memory_with_the_payload(spec):
    # loads documents that tensors sent as none are views of the payload; every other codec
    # decodes into memory of its own, which neither a caller reusing the payload buffer nor
    # a change to another decoded tensor can touch.
    tensors = mixed_tensors()
    payload = bytearray(dumps(tensors, {}, spec))
    decoded, _ = loads(payload)
    before = {k: v.clone() for k, v in decoded.items()}
    base = np.frombuffer(payload, np.uint8).ctypes.data
    views = {k for k, v in decoded.items() if v.numel() and base <= v.data_ptr() < base + len(payload)}
    chosen = parse_codec(spec)
    sent_none = {
        k for k, v in tensors.items() if chosen.for_tensor(v.numel(), v.is_floating_point()).name == "none"
    }
    assert views == sent_none - {"e"}  # an empty tensor has no bytes to share

    payload[:] = bytes(len(payload))  # the caller reuses its buffer
    for name, v in decoded.items():
        if name in views:
            assert not before[name].any() or not torch.equal(v, before[name]), name
        else:
            assert torch.equal(v, before[name]), name
    changed = {k for k, v in decoded.items() if k not in views and v.numel() and v.dtype != torch.bool}
    for name in changed:
        decoded[name] += 1  # in place: each owns its memory (lossy float32 ones share one arena)
    for name in changed:
        assert torch.equal(decoded[name], before[name] + 1), name


def test_a_bad_field_is_named_by_its_escaped_key():
    data = dumps({"w": torch.randn(4)})
    bad = data.replace(b"\xa4data\xc6", b"\xa4da\nt\xc7")  # a key with a newline, then no bin
    with pytest.raises(WireFormatError, match=r"^field 'da\\nt': payload must be bin"):
        loads(bad)
