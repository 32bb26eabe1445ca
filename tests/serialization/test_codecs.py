"""Each codec's stated error and ratio on a known tensor, plus property tests over shapes."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from serialization import CODECS, UnknownCodec, dumps, loads, parse_codec
from serialization.codecs import EXAMPLES
from serialization.kernels import select_topk, topk_count
from serialization.wire import DTYPES

SPECS = (*EXAMPLES, "topk:0.1", "topk:1.0", "topk:0.001+int8")


@pytest.fixture(scope="module")
def normal_1m() -> torch.Tensor:
    """The known tensor: 1M seeded standard normals (odd length: exercises tails)."""
    return torch.randn(1_000_003, generator=torch.Generator().manual_seed(1234))


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_examples_cover_the_whole_registry():
    families = {parse_codec(s).name.split(":")[0] + ("+int8" * s.endswith("+int8")) for s in EXAMPLES}
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
        "topk:0.1+int4",
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
    spec=st.sampled_from(["int8", "topk:0.5+int8", "bf16"]),
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
