"""Each codec's stated error and ratio on a known tensor, plus property tests over shapes."""

from __future__ import annotations

import hypothesis.strategies as st
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from serialization import CODECS, UnknownCodec, WireFormatError, dumps, encoded_size_bound, loads, parse_codec
from serialization.codecs import EXAMPLES
from serialization.kernels import TOPK_BLOCK, select_block_topk, select_topk, topk_count
from serialization.wire import DTYPES

SPECS = (
    *EXAMPLES,
    "topk:0.1",
    "topk:1.0",
    "topk:0.001+int8",
    "topk:0.1+int2",
    "topk:1.0+int4",
    "topk:0.001+int4",
)
BLOCK_SPECS = ("topk:0.01+int2", "topk:0.01+int4", "topk:0.3+int2", "topk:1.0+int4")


@pytest.fixture(scope="module")
def normal_1m() -> torch.Tensor:
    """The known tensor: 1M seeded standard normals (odd length: exercises tails)."""
    return torch.randn(1_000_003, generator=torch.Generator().manual_seed(1234))


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_examples_cover_the_whole_registry():
    families = set()
    for spec in EXAMPLES:
        name = parse_codec(spec).name
        families.add(name.split(":")[0] + ("+" + name.split("+")[1] if "+" in name else ""))
    assert families == set(CODECS)


@pytest.mark.parametrize("spec", SPECS)
def test_codec_meets_its_stated_error_and_ratio_on_a_known_tensor(spec, normal_1m):
    codec = parse_codec(spec)
    data = dumps({"x": normal_1m}, None, codec)
    decoded = loads(data)[0]["x"]
    assert decoded.dtype == torch.float32 and decoded.shape == normal_1m.shape
    assert _rel_error(decoded, normal_1m) <= codec.expected_error()
    header = 400  # names, shape, 64-byte alignment padding: fixed per tensor
    assert len(data) <= 4 * normal_1m.numel() / codec.expected_ratio() + header


@pytest.mark.parametrize("spec", SPECS)
def test_subtract_decoded_leaves_exactly_the_unsent_part(spec):
    codec = parse_codec(spec)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    fields = codec.encode(x)
    residual = x.numpy().copy()
    codec.subtract_decoded_(residual, fields)
    decoded = codec.decode({k: memoryview(v) for k, v in fields.items()}, 5000, torch.float32)
    np.testing.assert_allclose(residual, (x - decoded).numpy(), atol=1e-6)


def test_stated_ratios_meet_the_issue_goals():
    assert parse_codec("int8").expected_ratio() >= 3.9
    assert parse_codec("topk:0.01+int8").expected_ratio() >= 60
    assert parse_codec("topk:0.01+int4").expected_ratio() >= 180
    assert parse_codec("topk:0.01+int2").expected_ratio() >= 200


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.37+int8", "topk:1"])
@pytest.mark.parametrize("n", [1, 7, 100, 65_537, 300_001])
def test_topk_sends_exactly_round_f_n_entries(spec, n):
    codec = parse_codec(spec)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    k = topk_count(codec.fraction, n)
    assert codec.encode(x)["idx"].size == 2 * k
    decoded = codec.decode({k_: memoryview(v) for k_, v in codec.encode(x).items()}, n, torch.float32)
    assert int((decoded != 0).sum()) == k


def test_topk_keeps_the_largest_magnitudes_even_with_ties_and_sampling():
    x = np.random.default_rng(3).standard_normal(1 << 20).astype(np.float32)
    x[::7] = 0.0
    k = topk_count(0.01, x.size)
    chosen = select_topk(x, k)
    assert chosen.size == k and np.all(np.diff(chosen) > 0)
    assert np.abs(x[chosen]).min() >= np.sort(np.abs(x))[-k]


def test_topk_handles_non_finite_values_without_losing_the_count():
    x = np.ones(1000, np.float32)
    x[:5] = np.nan
    assert select_topk(x, 10).size == 10


@pytest.mark.parametrize(
    "spec",
    [
        "topk:0",
        "topk:1.5",
        "topk:-0.1",
        "topk:nan",
        "topk:",
        "topk:x",
        "int4",
        "",
        "topk:0.1+int3",
        "topk:0.01+int16",
        "topk:0.01+int2+int8",
        "topk:+int2",
        "topk:2+int4",
        "TOPK",
        "topk:inf",
    ],
)
def test_bad_specs_raise_unknown_codec_listing_valid_forms(spec):
    with pytest.raises(UnknownCodec, match="valid: none, fp16"):
        parse_codec(spec)


def test_unknown_codec_is_a_value_error_for_cli_handling():
    with pytest.raises(ValueError):
        parse_codec("nope")


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("INT8", "int8"),
        (" fp16 ", "fp16"),
        ("topk:.01", "topk:0.01"),
        ("topk:1", "topk:1.0"),
        ("topk:0.010+INT8", "topk:0.01+int8"),
        ("topk:0.010+INT2", "topk:0.01+int2"),
        (" topk:1+int4", "topk:1.0+int4"),
    ],
)
def test_specs_normalise_to_a_canonical_name_that_parses_back(spec, name):
    assert parse_codec(spec).name == name
    assert parse_codec(name).name == name


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16))
def test_any_shape_and_dtype_round_trips_with_shape_and_dtype_kept(shape, dtype, spec, seed):
    gen = torch.Generator().manual_seed(seed)
    source = (torch.randn(shape, generator=gen) * 50).to(dtype)
    tensors, meta = loads(dumps({"t": source}, {"seed": seed}, spec))
    out = tensors["t"]
    assert out.shape == source.shape and out.dtype == dtype and meta == {"seed": seed}
    codec = parse_codec(spec)
    if not codec.lossy or not dtype.is_floating_point:
        assert torch.equal(out, source)
    elif source.numel() and not spec.startswith("topk"):
        assert _rel_error(out, source) <= 0.05 + codec.expected_error()


finite32 = st.floats(-(2.0**99), 2.0**99, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite32, min_size=1, max_size=600),
    spec=st.sampled_from(["int8", "topk:0.5+int8", "bf16", "topk:0.5+int4", "topk:0.5+int2"]),
)
def test_quantisation_error_stays_within_half_a_step_per_block(values, spec):
    x = torch.tensor(values, dtype=torch.float32)
    out = loads(dumps({"x": x}, None, spec))[0]["x"]
    assert torch.isfinite(out).all()
    if spec == "int8":
        for block in range(0, x.numel(), 256):
            xb, ob = x[block : block + 256], out[block : block + 256]
            step = xb.abs().max() / 127
            assert float((xb - ob).abs().max()) <= float(step) * 0.5001 + 1e-30


def _fields(codec, x: torch.Tensor) -> dict[str, memoryview]:
    return {k: memoryview(v) for k, v in codec.encode(x).items()}


@pytest.mark.parametrize("spec", BLOCK_SPECS)
@pytest.mark.parametrize("n", [1, 7, 32, 4095, 4096, 4097, 3 * 4096 + 5])
def test_block_topk_round_trips_through_the_wire_keeping_the_largest_k_b_of_each_block(spec, n):
    codec = parse_codec(spec)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e-3
    steps = torch.arange(n)
    tensors, _ = loads(dumps({"x": x, "steps": steps, "mask": steps % 3 == 0}, None, codec))
    assert torch.equal(tensors["steps"], steps) and torch.equal(tensors["mask"], steps % 3 == 0)
    out = tensors["x"]
    assert torch.equal(out, codec.decode(_fields(codec, x), n, torch.float32))
    for start in range(0, n, TOPK_BLOCK):
        block, sent = x[start : start + TOPK_BLOCK].numpy(), out[start : start + TOPK_BLOCK].numpy()
        kept = sent != 0
        assert kept.sum() == topk_count(codec.fraction, block.size)
        assert np.abs(block[kept]).min() >= np.abs(block[~kept]).max(initial=0)
        assert np.array_equal(np.sign(sent[kept]), np.sign(block[kept]))


def test_a_small_bias_costs_a_scale_and_a_few_bytes():
    assert parse_codec("topk:0.01+int2").field_sizes(32, 4) == {"data": 4 + 2 + 1}
    assert parse_codec("topk:0.01+int4").field_sizes(32, 4) == {"data": 4 + 2 + 1}


@pytest.mark.parametrize("spec", BLOCK_SPECS)
def test_block_topk_subtracts_exactly_what_it_decodes(spec):
    codec = parse_codec(spec)
    x = torch.randn(3 * TOPK_BLOCK + 77, generator=torch.Generator().manual_seed(9))
    fields = codec.encode(x)
    residual = x.numpy().copy()
    codec.subtract_decoded_(residual, fields)
    decoded = codec.decode({k: memoryview(v) for k, v in fields.items()}, x.numel(), torch.float32)
    assert np.array_equal(residual, (x - decoded).numpy())


def test_block_topk_decodes_into_a_given_buffer_and_zeroes_the_rest():
    codec = parse_codec("topk:0.01+int2")
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    out = np.full(10_000, 7.0, np.float32)
    decoded = codec.decode(_fields(codec, x), 10_000, torch.float32, out)
    assert np.shares_memory(decoded.numpy(), out)
    assert torch.equal(decoded, codec.decode(_fields(codec, x), 10_000, torch.float32))


@pytest.mark.parametrize("spec", ["topk:0.01+int2", "topk:0.3+int4"])
def test_an_all_zero_delta_decodes_to_exact_zeros(spec):
    tensors, _ = loads(dumps({"z": torch.zeros(3, 5000)}, None, spec))
    assert torch.equal(tensors["z"], torch.zeros(3, 5000))


@pytest.mark.parametrize(
    ("spec", "data", "levels"),
    [
        # scale float32 | offsets 4, 7, 8 as 12-bit pairs | codes 3, 2, 0 (2 bits, low first)
        ("topk:0.3+int2", "d850de3f04700008000b", [1.5, 0.5, -1.5]),
        # scale float32 | offsets 4, 7, 8 | codes 13, 11, 0 (4 bits, low first)
        ("topk:0.3+int4", "52e9c83e0470000800bd00", [5.5, 3.5, -7.5]),
    ],
)
def test_golden_bytes_of_block_topk_decode_by_the_documented_layout(spec, data, levels):
    x = torch.tensor([0.5, -1.0, 0.25, 0.0, 2.0, -0.125, 0.75, 1.5, -3.0, 0.0625])
    payload = dumps({"w": x}, None, spec)
    tensor = msgpack.unpackb(payload)["tensors"][0]
    assert tensor["codec"] == spec and tensor["data"].hex() == data
    scale = np.frombuffer(bytes.fromhex(data)[:4], "<f4")[0]
    expected = np.zeros(10, np.float32)
    expected[[4, 7, 8]] = np.float32(levels) * scale
    assert np.array_equal(loads(payload)[0]["w"].numpy(), expected)


def _with_data(payload: bytes, edit) -> bytes:
    message = msgpack.unpackb(payload)
    message["tensors"][0]["data"] = edit(message["tensors"][0]["data"])
    return msgpack.packb(message, use_bin_type=True)


@pytest.mark.parametrize("spec", ["topk:0.01+int2", "topk:0.3+int4"])
@pytest.mark.parametrize("edit", [lambda d: d[:-1], lambda d: d + b"\0", lambda d: b""])
def test_block_topk_fields_of_the_wrong_size_are_refused(spec, edit):
    payload = dumps({"w": torch.randn(5000)}, None, spec)
    assert torch.equal(loads(_with_data(payload, lambda d: d))[0]["w"], loads(payload)[0]["w"])
    with pytest.raises(WireFormatError, match="needs"):
        loads(_with_data(payload, edit))


@pytest.mark.parametrize(
    ("offsets", "error"),
    [("0440000800", "must increase"), ("0470000700", "must increase"), ("0470000a00", "out of range")],
)
def test_block_topk_offsets_that_repeat_or_fall_outside_are_refused(offsets, error):
    payload = dumps({"w": torch.arange(10.0)}, None, "topk:0.3+int2")  # 3 offsets after a 4-byte scale
    forged = _with_data(payload, lambda d: d[:4] + bytes.fromhex(offsets) + d[9:])
    with pytest.raises(WireFormatError, match=error):
        loads(forged)


def test_block_topk_keeps_exactly_k_b_per_block_with_ties_zeros_and_nan():
    x = np.random.default_rng(3).standard_normal(40 * TOPK_BLOCK + 1000).astype(np.float32)
    x[::7] = 0.0
    x[5 * TOPK_BLOCK : 7 * TOPK_BLOCK] = 0.0  # every entry ties
    x[9 * TOPK_BLOCK : 10 * TOPK_BLOCK] = 1.0
    x[12 * TOPK_BLOCK + 3] = np.nan
    k_full, k_tail = topk_count(0.01, TOPK_BLOCK), topk_count(0.01, 1000)
    idx = select_block_topk(x, k_full, k_tail)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(idx // TOPK_BLOCK).tolist() == [k_full] * 40 + [k_tail]
    mag = np.abs(x)
    mag[np.isnan(mag)] = np.inf  # NaN counts as largest
    for start in range(0, x.size, TOPK_BLOCK):
        block, kept = mag[start : start + TOPK_BLOCK], idx[idx // TOPK_BLOCK == start // TOPK_BLOCK]
        assert mag[kept].min() >= np.sort(block)[-kept.size]
    assert np.array_equal(idx[idx // TOPK_BLOCK == 5] % TOPK_BLOCK, np.arange(k_full))  # ties: lowest first
    assert 12 * TOPK_BLOCK + 3 in idx


# Size policies: CODEC@N[:SMALL] picks a codec per tensor from its element count.


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("topk:0.01+int2@4096", "topk:0.01+int2@4096"),
        ("TOPK:.01+INT2@4096:NONE", "topk:0.01+int2@4096"),
        ("topk:0.01+int2@4096:int8", "topk:0.01+int2@4096:int8"),
        (" int8@100:fp16 ", "int8@100:fp16"),
        ("topk:0.01@1", "topk:0.01@1"),
    ],
)
def test_size_policy_specs_normalise_to_a_canonical_name_that_parses_back(spec, name):
    assert parse_codec(spec).name == name
    assert parse_codec(name).name == name


@pytest.mark.parametrize(
    "spec",
    [
        "topk:0.01+int2@",
        "topk:0.01+int2@0",
        "topk:0.01+int2@-5",
        "topk:0.01+int2@4k",
        "topk:0.01+int2@1e3",
        "topk:0.01+int2@4096:topk:0.1",
        "topk:0.01+int2@4096:int2",
        "topk:0.01+int2@4096:",
        "topk:0.01+int2@4096@8",
        "@4096",
        "int4@4096",
        "topk:0.01+int2@99999999999999999",
        "topk:0.01+int2@\uff14\uff10\uff19\uff16",  # full-width digits
    ],
)
def test_bad_size_policies_raise_unknown_codec_listing_valid_forms(spec):
    with pytest.raises(UnknownCodec, match="valid: none, fp16"):
        parse_codec(spec)


def test_size_policy_picks_small_below_the_threshold_and_none_for_non_floats():
    policy = parse_codec("topk:0.01+int2@4096:int8")
    assert policy.lossy
    assert policy.for_tensor(4095, True).name == "int8"
    assert policy.for_tensor(4096, True).name == "topk:0.01+int2"
    assert policy.for_tensor(1_000_000, False).name == "none"
    assert parse_codec("topk:0.01+int2@4096").for_tensor(17, True).name == "none"
    assert not parse_codec("none@10").lossy


def test_a_policy_sends_each_tensor_with_the_codec_it_picks():
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "w": torch.randn(64, 128, generator=gen),
        "b": torch.randn(17, generator=gen),
        "g": torch.randn(300, generator=gen),
        "steps": torch.arange(5),
    }
    spec = "topk:0.01+int2@4096:int8"
    data = dumps(tensors, None, spec)
    headers = {t["name"]: t["codec"] for t in msgpack.unpackb(data, raw=False)["tensors"]}
    assert headers == {"w": "topk:0.01+int2", "b": "int8", "g": "int8", "steps": "none"}
    assert len(data) <= encoded_size_bound({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, spec)
    expect = {
        k: (tuple(v.shape), v.dtype, parse_codec(spec).for_tensor(v.numel(), v.is_floating_point()).name)
        for k, v in tensors.items()
    }
    out, _ = loads(data, expect=expect)
    assert torch.equal(out["steps"], tensors["steps"])
    assert _rel_error(out["b"], tensors["b"]) < 0.01
    plain = loads(dumps(tensors, None, "topk:0.01+int2@18"))[0]
    assert torch.equal(plain["b"], tensors["b"])  # 17 < 18 elements: sent exactly


def test_a_policy_whose_tensors_all_pick_one_codec_writes_that_codecs_bytes():
    gen = torch.Generator().manual_seed(4)
    tensors = {"a": torch.randn(8192, generator=gen), "b": torch.randn(5000, generator=gen)}
    assert dumps(tensors, None, "topk:0.01+int2@4096") == dumps(tensors, None, "topk:0.01+int2")
    assert dumps(tensors, None, "topk:0.01+int2@10000") == dumps(tensors, None, "none")


def test_a_header_naming_a_size_policy_is_rejected():
    data = dumps({"b": torch.ones(4)}, None, "none")
    forged = data.replace(b"\xa4none", b"\xa6none@4", 1)
    with pytest.raises(WireFormatError, match="size policy"):
        loads(forged)


def test_a_reader_expecting_a_policys_picks_refuses_an_upload_that_ignored_the_policy():
    tensors = {"w": torch.randn(4096), "b": torch.randn(17)}
    policy = parse_codec("topk:0.01+int2@4096")
    expect = {
        k: (tuple(v.shape), v.dtype, policy.for_tensor(v.numel(), True).name) for k, v in tensors.items()
    }
    loads(dumps(tensors, None, policy), expect=expect)
    with pytest.raises(WireFormatError, match=r"'b' is encoded with topk:0\.01\+int2, expected none"):
        loads(dumps(tensors, None, "topk:0.01+int2"), expect=expect)
