"""Fuzzing loads: random and mutated payloads only ever raise WireFormatError."""

from __future__ import annotations

import random
import time
import tracemalloc

import msgpack
import pytest
import torch

from serialization import WireFormatError, dumps, loads

LIMIT = 1 << 20
MAX_DECODED = 4 << 20
SPECS = ["none", "fp16", "bf16", "int8", "topk:0.25", "topk:0.5+int8", "topk:0.25+int4", "topk:0.5+int2"]


def _seeds() -> list[bytes]:
    """Valid small payloads over every codec and a spread of dtypes and shapes."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 70, generator=gen),
        "b": torch.randn(5, generator=gen).double(),
        "i": torch.arange(6).reshape(2, 3),
        "m": torch.tensor([True, False]),
        "s": torch.tensor(2.5).half(),
        "e": torch.zeros(0, 4),
    }
    return [dumps(tensors, {"round": 3, "tags": ["a", {"b": None}]}, spec) for spec in SPECS]


def _random_obj(rng: random.Random, depth: int = 0) -> object:
    """A random msgpack-able value, nested a few levels."""
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 255, 2**31, -(2**40), 2**64 - 1, rng.randrange(-999, 999)])
    if kind == 2:
        return rng.choice([0.5, float("nan"), float("inf"), -1e300])
    if kind == 3:
        return rng.choice(
            [
                "v",
                "tensors",
                "meta",
                "name",
                "codec",
                "dtype",
                "shape",
                "data",
                "none",
                "int8",
                "topk:0.5",
                "q",
                "scale",
                "idx",
                "cnt",
                "val",
                "_data",
            ]
        )
    if kind == 4:
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 5:
        return "".join(rng.choice("abcé€") for _ in range(rng.randrange(6)))
    if kind == 6:
        return [_random_obj(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        return {str(_random_obj(rng, 4)): _random_obj(rng, depth + 1) for _ in range(rng.randrange(5))}
    return _random_tensor_map(rng, depth)


def _random_tensor_map(rng: random.Random, depth: int) -> dict:
    """A tensor map that is nearly right: one field wrong, missing or huge."""
    entry = {
        "name": "x",
        "codec": rng.choice([*SPECS, "topk:1e-9", "zip"]),
        "dtype": rng.choice([0, 3, 4, 9, 10, -1]),
        "shape": rng.choice([[4], [], [0], [2**40], [2**31, 2**31], [-3], [2**63]]),
        "data": rng.randbytes(rng.choice([0, 4, 16])),
        "q": b"\x01" * 4,
        "scale": b"\x00\x00\x80\x3f",
        "idx": b"\x00\x00",
        "cnt": b"\x01\x00\x00\x00",
        "val": b"\x00\x00\x80\x3f",
    }
    if rng.random() < 0.5:
        del entry[rng.choice(list(entry))]
    if rng.random() < 0.3:
        entry[rng.choice(list(entry) or ["name"])] = _random_obj(rng, depth + 1)
    return entry


def _message(rng: random.Random) -> bytes:
    """A random msgpack message shaped roughly like ours."""
    tensors = [_random_tensor_map(rng, 0) for _ in range(rng.randrange(3))]
    body: dict = {
        "v": rng.choice([1, 1, 1, 0, 2, "1"]),
        "tensors": tensors,
        "meta": _random_obj(rng) if rng.random() < 0.3 else {"k": _random_obj(rng)},
    }
    if rng.random() < 0.1:
        body = _random_obj(rng)  # type: ignore[assignment]
    return msgpack.packb(body, use_bin_type=True)


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    """Bit flips, truncation, splicing, insertion, or pure noise."""
    buf = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and buf:
        for _ in range(rng.randrange(1, 9)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del buf[rng.randrange(len(buf) + 1) :]
    elif kind == 2:
        other = rng.choice(seeds)
        buf = buf[: rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif kind == 3:
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = rng.randbytes(rng.randrange(1, 9))
    elif kind == 4 and buf:
        at = rng.randrange(len(buf))
        buf[at] = rng.choice([0xC0, 0xC1, 0xC6, 0xDD, 0xDF, 0xCF, 0xFF, 0x00, 0x7F])
    else:
        buf = bytearray(rng.randbytes(rng.randrange(64)))
    return bytes(buf)


def _check(data: bytes) -> bool:
    """Decode; True if it decoded, False if it raised WireFormatError; anything else fails."""
    try:
        tensors, meta = loads(data, limit=LIMIT, max_decoded=MAX_DECODED)
    except WireFormatError as e:
        assert str(e), "errors must say what is wrong"
        return False
    assert isinstance(tensors, dict) and isinstance(meta, dict)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    return True


def test_ten_thousand_random_and_mutated_payloads_only_raise_wire_format_error():
    rng = random.Random(20261122)
    seeds = _seeds()
    assert all(_check(s) for s in seeds)
    started, outcomes = time.perf_counter(), []
    for i in range(12_000):
        if i % 4 == 0:
            data = _message(rng)
        else:
            data = _mutate(rng, rng.choice(seeds), seeds)
            if rng.random() < 0.2:
                data = _mutate(rng, data, seeds)
        outcomes.append(_check(data))
    assert time.perf_counter() - started < 60
    assert 0 < sum(outcomes) < len(outcomes)  # some mutations still decode; most do not


def _huge_topk_payload(n: int) -> bytes:
    """A top-k tensor declaring n elements with index fields sized for n."""
    entry = {
        "name": "x",
        "codec": "topk:1e-09",
        "dtype": 0,
        "shape": [n],
        "idx": b"\x00\x00",
        "cnt": b"\x01\x00\x00\x00" + bytes(4 * (-(-n // 65536) - 1)),
        "val": b"\x00\x00\x80\x3f",
    }
    return msgpack.packb({"v": 2, "tensors": [entry], "meta": {}}, use_bin_type=True)


def _huge_block_topk_payload(n: int) -> bytes:
    """A block top-k tensor declaring n elements with a tiny data field."""
    entry = {"name": "x", "codec": "topk:1e-09+int2", "dtype": 0, "shape": [n], "data": bytes(16)}
    return msgpack.packb({"v": 2, "tensors": [entry], "meta": {}}, use_bin_type=True)


@pytest.mark.parametrize(
    "payload",
    [
        _huge_topk_payload(1 << 26),
        _huge_block_topk_payload(1 << 26),
        _huge_block_topk_payload(1 << 62),
        msgpack.packb(
            {
                "v": 2,
                "tensors": [
                    {"name": "x", "codec": "none", "dtype": 3, "shape": [2**31, 2**31], "data": b"1234"}
                ],
                "meta": {},
            }
        ),
        msgpack.packb(
            {
                "v": 2,
                "tensors": [
                    {"name": "x", "codec": "int8", "dtype": 0, "shape": [2**40], "q": b"", "scale": b""}
                ],
                "meta": {},
            }
        ),
        b"\x83\xa1v\x01\xa7tensors\xdd\xff\xff\xff\xff",
        b"\x83\xa1v\x01\xa7tensors\x91\x85\xa4name\xdb\xff\xff\xff\xff",
        b"\x83\xa1v\x01\xa7tensors\x90\xa4meta\xdf\xff\xff\xff\xff",
    ],
)
def test_payloads_declaring_huge_sizes_fail_without_allocating_them(payload):
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError):
            loads(payload, limit=1 << 20, max_decoded=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("spec", ["topk:0.0001", "topk:0.0001+int2"])
def test_a_small_limit_bounds_the_allocation_of_an_honest_but_large_topk_payload(spec):
    data = dumps({"x": torch.zeros(1 << 22)}, None, spec)
    assert len(data) < 1 << 20
    with pytest.raises(WireFormatError, match="decode limit"):
        loads(data, limit=1 << 20, max_decoded=1 << 20)


def test_meta_nested_beyond_the_depth_limit_is_rejected():
    meta: object = 1
    for _ in range(200):
        meta = [meta]
    body = msgpack.packb({"v": 2, "tensors": [], "meta": {"m": meta}})
    with pytest.raises(WireFormatError, match="deeper"):
        loads(body)
    with pytest.raises(WireFormatError):
        loads(b"\x83\xa1v\x01\xa7tensors\x90\xa4meta" + b"\x91" * 5000 + b"\x00")
