"""The wire format: pinned bytes, round trips, zero-copy views and clear errors."""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest
import torch

from serialization import (
    FORMAT_VERSION,
    MAX_META_BYTES,
    UnknownCodec,
    WireFormatError,
    dumps,
    dumps_stream,
    encoded_size_bound,
    loads,
)
from serialization.wire import DTYPES

GOLDEN_NONE = bytes.fromhex(
    "83a17602a774656e736f72739286a46e616d65a177a5636f646563a46e6f6e65a5647479706500a5736861706591"
    "02a55f64617461c43f" + "00" * 63 + "a464617461c6000000080000803f000000c086a46e616d65a16ea563"
    "6f646563a46e6f6e65a5647479706504a573686170659101a55f64617461c40400000000a464617461c600000008"
    "0300000000000000a46d65746181a5726f756e6401"
)
GOLDEN_TOPK_INT8 = bytes.fromhex(
    "83a17602a774656e736f7273918ca46e616d65a177a5636f646563ad746f706b3a302e352b696e7438a564747970"
    "6500a573686170659104a45f696478c438" + "00" * 56 + "a3696478c60000000400000100a45f636e74c4"
    "2c" + "00" * 44 + "a3636e74c60000000402000000a25f71c430" + "00" * 48 + "a171c6000000024081"
    "a65f7363616c65c42a" + "00" * 42 + "a57363616c65c6000000040402013ca46d65746180"
)


def test_golden_bytes_of_a_small_none_payload_are_pinned():
    data = dumps({"w": torch.tensor([1.0, -2.0]), "n": torch.tensor([3])}, {"round": 1})
    assert data == GOLDEN_NONE, "wire bytes changed: bump FORMAT_VERSION and update the golden"
    assert FORMAT_VERSION == 2


def test_golden_bytes_of_a_small_topk_int8_payload_are_pinned():
    data = dumps({"w": torch.tensor([0.5, -1.0, 0.25, 0.0])}, None, "topk:0.5+int8")
    assert data == GOLDEN_TOPK_INT8


def test_golden_payload_is_plain_msgpack_that_any_reader_can_parse():
    message = msgpack.unpackb(GOLDEN_NONE)
    assert message["v"] == 2 and message["meta"] == {"round": 1}
    assert [t["name"] for t in message["tensors"]] == ["w", "n"]
    assert np.frombuffer(message["tensors"][0]["data"], "<f4").tolist() == [1.0, -2.0]


def test_golden_payload_decodes_to_the_original_tensors():
    tensors, meta = loads(GOLDEN_NONE)
    assert tensors["w"].tolist() == [1.0, -2.0] and tensors["n"].dtype == torch.int64
    assert meta == {"round": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_none_round_trip_is_exact_for_every_dtype(dtype):
    source = (torch.arange(24) % 3).to(dtype).reshape(2, 3, 4)
    tensors, _ = loads(dumps({"x": source}))
    assert tensors["x"].dtype == dtype and torch.equal(tensors["x"], source)


def test_none_tensors_are_views_of_the_payload_without_a_copy():
    data = dumps({"x": torch.randn(1000), "y": torch.randn(3, dtype=torch.float64)})
    tensors, _ = loads(data)
    base = np.frombuffer(data, np.uint8).ctypes.data
    for t in tensors.values():
        assert base <= t.data_ptr() < base + len(data)


def test_misaligned_buffers_decode_by_copying():
    data = dumps({"x": torch.arange(10, dtype=torch.float64)})
    shifted = memoryview(bytearray(b"\0" + data))[1:]
    tensors, _ = loads(shifted)
    assert tensors["x"].tolist() == list(map(float, range(10)))


def test_payloads_are_64_byte_aligned_from_the_message_start():
    data = dumps({"a": torch.randn(3), "bb": torch.randn(5)}, None, "int8")
    message = msgpack.unpackb(data)
    for t in message["tensors"]:
        for key, value in t.items():
            if isinstance(value, bytes) and not key.startswith("_") and value:
                assert data.index(value) % 64 == 0


def test_meta_round_trips_plain_values():
    meta = {
        "run": "r",
        "samples": 3,
        "loss": 2.5,
        "ok": True,
        "none": None,
        "list": [1, "a", [2.0]],
        "nested": {"a": {"b": 1}},
        "raw": b"\x00\x01",
    }
    assert loads(dumps({}, meta))[1] == meta


@pytest.mark.parametrize("meta", [{"t": torch.zeros(1)}, {1: "int key"}, {"x": object()}])
def test_dumps_refuses_meta_that_is_not_plain_msgpack(meta):
    with pytest.raises((TypeError, ValueError)):
        dumps({}, meta)


def test_dumps_refuses_oversize_or_too_deep_meta():
    with pytest.raises(ValueError, match="limit"):
        dumps({}, {"blob": b"x" * MAX_META_BYTES})
    deep: dict = {}
    for _ in range(40):
        deep = {"d": deep}
    with pytest.raises(ValueError, match="deeper"):
        dumps({}, deep)


def test_dumps_refuses_bad_codec_specs_with_the_valid_forms():
    with pytest.raises(UnknownCodec, match="topk:F"):
        dumps({"x": torch.zeros(2)}, None, "gzip")


def test_dumps_refuses_unsupported_dtypes_and_non_tensors():
    with pytest.raises(ValueError, match="dtype"):
        dumps({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        dumps({"x": [1, 2]})


def test_lossy_codecs_send_non_float_tensors_as_none():
    tensors, _ = loads(dumps({"i": torch.arange(5), "b": torch.tensor([True])}, None, "int8"))
    assert tensors["i"].tolist() == [0, 1, 2, 3, 4] and tensors["b"].tolist() == [True]
    assert msgpack.unpackb(dumps({"i": torch.arange(5)}, None, "int8"))["tensors"][0]["codec"] == "none"


def test_lossy_codecs_return_the_declared_float_dtype():
    source = {"h": torch.randn(300).half(), "d": torch.randn(300, dtype=torch.float64)}
    tensors, _ = loads(dumps(source, None, "int8"))
    assert tensors["h"].dtype == torch.float16 and tensors["d"].dtype == torch.float64


def test_gpu_style_inputs_requiring_grad_and_non_contiguous_are_accepted():
    x = torch.randn(4, 6, requires_grad=True)
    tensors, _ = loads(dumps({"x": x.t()}))
    assert torch.equal(tensors["x"], x.detach().t())


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "topk:0.01", "topk:0.3+int8"])
def test_encoded_size_bound_holds_for_every_codec(codec):
    shapes = {"emb": (1000, 17), "b": (17,), "scalar": (), "empty": (0, 5)}
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    meta = {"pad": "x" * 60000}
    assert len(dumps(tensors, meta, codec)) <= encoded_size_bound(shapes, codec)


def test_encoded_size_bound_uses_given_dtypes():
    data = dumps({"x": torch.zeros(1000, dtype=torch.float64)})
    assert len(data) > encoded_size_bound({"x": (1000,)}, "none") - MAX_META_BYTES
    assert len(data) <= encoded_size_bound({"x": ((1000,), torch.float64)}, "none")


def test_upload_bound_of_topk_is_much_smaller_than_the_model():
    shapes = {"w": (4096, 1024)}
    assert encoded_size_bound(shapes, "topk:0.01+int8") < 4 * 4096 * 1024 / 50


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "truncated"),
        (b"\x90", "expected a map"),
        (msgpack.packb({"v": 3, "tensors": [], "meta": {}}), "version 3"),
        (msgpack.packb({"v": 1, "tensors": [], "meta": {}}), "version 1"),  # before chunk lists
        (msgpack.packb({"v": 2, "tensors": [], "meta": []}), "meta must be a map"),
        (msgpack.packb({"v": 2, "meta": {}, "tensors": []}), "expected key 'tensors'"),
        (msgpack.packb({"v": 2, "tensors": [], "meta": {}}) + b"\x00", "trailing"),
        (msgpack.packb({"v": 2, "tensors": [{"name": "x"}], "meta": {}}), "lacks codec, dtype, shape"),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "zip", "dtype": 0, "shape": [], "data": b"1234"}],
                    "meta": {},
                }
            ),
            "unknown codec",
        ),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "none", "dtype": 42, "shape": [], "data": b"1234"}],
                    "meta": {},
                }
            ),
            "dtype code 42",
        ),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "none", "dtype": 0, "shape": [-1], "data": b""}],
                    "meta": {},
                }
            ),
            "negative",
        ),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "none", "dtype": 0, "shape": [2], "data": b"1234"}],
                    "meta": {},
                }
            ),
            "needs 8",
        ),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "int8", "dtype": 4, "shape": [1], "data": b"1234"}],
                    "meta": {},
                }
            ),
            "lossy codec",
        ),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "none", "dtype": 0, "shape": [], "data": "text"}],
                    "meta": {},
                }
            ),
            "must be bin",
        ),
        (
            msgpack.packb(
                {
                    "v": 2,
                    "tensors": [{"name": "x", "codec": "none", "dtype": 9, "shape": [1], "data": b"\x07"}],
                    "meta": {},
                }
            ),
            "bool bytes",
        ),
    ],
)
def test_malformed_payloads_raise_wire_format_error_naming_the_problem(payload, message):
    with pytest.raises(WireFormatError, match=message):
        loads(payload)


def test_duplicate_tensor_names_are_rejected():
    entry = {"name": "x", "codec": "none", "dtype": 8, "shape": [1], "data": b"\x01"}
    with pytest.raises(WireFormatError, match="duplicate tensor name"):
        loads(msgpack.packb({"v": 2, "tensors": [entry, entry], "meta": {}}))


def test_payloads_over_the_limit_are_rejected_before_parsing():
    data = dumps({"x": torch.zeros(100)})
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        loads(data, limit=len(data) - 1)


def test_declared_sizes_over_the_decode_limit_are_rejected_before_allocating():
    data = dumps({"x": torch.zeros(1 << 20)}, None, "topk:0.001")
    with pytest.raises(WireFormatError, match="decode limit"):
        loads(data, max_decoded=1 << 20)
    assert loads(data, max_decoded=4 << 20)[0]["x"].shape == (1 << 20,)


def test_non_bytes_input_raises_wire_format_error():
    with pytest.raises(WireFormatError, match="bytes-like"):
        loads("not bytes")  # type: ignore[arg-type]


# --- expected headers: checked before anything is allocated ----------------------------
EXPECT = {"w": ((4, 3), torch.float32, "int8"), "b": ((3,), torch.float32, "int8")}


def test_a_message_matching_the_expected_headers_decodes():
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    decoded, _ = loads(dumps(tensors, {}, "int8"), expect=EXPECT)
    assert set(decoded) == {"w", "b"}


@pytest.mark.parametrize(
    ("tensors", "codec", "error"),
    [
        ({"w": torch.randn(4, 3)}, "int8", "1 tensors, expected 2"),
        ({"w": torch.randn(4, 3), "x": torch.randn(3)}, "int8", "unexpected tensor 'x'"),
        ({"w": torch.randn(3, 4), "b": torch.randn(3)}, "int8", "shape (3, 4)"),
        ({"w": torch.randn(4, 3).double(), "b": torch.randn(3)}, "int8", "dtype"),
        ({"w": torch.randn(4, 3), "b": torch.randn(3)}, "fp16", "encoded with fp16"),
    ],
)
def test_headers_that_differ_from_the_expected_model_are_refused(tensors, codec, error):
    with pytest.raises(WireFormatError, match=re.escape(error)):
        loads(dumps(tensors, {}, codec), expect=EXPECT)


def test_a_tiny_upload_claiming_a_huge_sparse_tensor_is_refused_before_allocating():
    # 1e-9 of a (65536, 4096) tensor is one entry: a few KB that would decode to 1 GiB.
    huge = dumps({"w": torch.zeros(1, 1)}, {}, "topk:1e-09")
    forged = huge.replace(msgpack.packb([1, 1]), msgpack.packb([65536, 4096]), 1)
    with pytest.raises(WireFormatError):
        loads(forged, expect={"w": ((1, 1), torch.float32, "topk:1e-09")})


@pytest.mark.parametrize(
    "codec", ["none", "fp16", "bf16", "int8", "topk:0.1", "topk:0.1+int8", "topk:0.05+int2"]
)
def test_a_streamed_message_is_byte_for_byte_the_gathered_one(codec):
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(300, 70),
        "h": torch.randn(5).half(),
        "n": torch.arange(7),
        "b": torch.tensor([True, False]),
        "s": torch.tensor(2.5),
    }
    visited: list[tuple[str, str]] = []
    streamed = dumps_stream(
        tensors, {"round": 3}, codec, lambda name, used, _: visited.append((name, used.name))
    )
    pieces = [bytes(piece) for piece in streamed.pieces]
    assert b"".join(pieces) == dumps(tensors, {"round": 3}, codec)
    assert sum(map(len, pieces)) == streamed.size
    assert [name for name, _ in visited] == list(tensors), "each tensor is encoded once, in order"
    assert dumps_stream(tensors, {"round": 3}, codec).gather() == dumps(tensors, {"round": 3}, codec)


def test_an_uncompressed_float_tensor_is_streamed_without_a_copy():
    weight = torch.randn(1000)
    pieces = list(dumps_stream({"w": weight}).pieces)
    (data,) = [p for p in pieces if p.nbytes == weight.numel() * 4]
    weight[0] = 123.0  # the piece is the tensor's own memory
    assert np.frombuffer(data, np.float32)[0] == 123.0
