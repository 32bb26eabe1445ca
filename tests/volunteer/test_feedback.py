"""Error feedback: the sum of what is sent tracks the sum of the true deltas."""

from __future__ import annotations

import pytest
import torch

from serialization import loads
from volunteer.feedback import RESIDUAL_DTYPE, Consumable, ErrorFeedback

SHAPES = {"emb": (256, 64), "w": (64, 64), "b": (64,)}
# How far the sum of what was sent may drift from the true sum minus the residual, relative
# to the gap: 1e-4 with a float32 residual; the bfloat16 one measures 1.2e-4 over fifty rounds.
DRIFT = 1e-3


def _delta(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=gen) * 0.01 for k, s in SHAPES.items()}


def _gap(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.01+int4", "topk:0.01+int2"])
def test_sum_of_sent_deltas_tracks_sum_of_true_deltas_over_fifty_rounds_of_topk(spec):
    gen, feedback = torch.Generator().manual_seed(0), ErrorFeedback()
    true = {k: torch.zeros(s) for k, s in SHAPES.items()}
    sent = {k: torch.zeros(s) for k, s in SHAPES.items()}
    gaps, one_delta = [], 0.0
    for round_ in range(50):
        delta = _delta(gen)
        one_delta = _gap(delta, {k: torch.zeros(s) for k, s in SHAPES.items()})
        decoded, meta = loads(feedback.encode(delta, {"round": round_}, spec))
        assert meta == {"round": round_}
        for k in SHAPES:
            true[k] += delta[k]
            sent[k] += decoded[k]
        gaps.append(_gap(true, sent))
        # the residual is kept in bfloat16: rounding loses ~2**-9 of it a round, in random directions
        assert abs(gaps[-1] - feedback.residual_norm()) <= DRIFT * (1 + gaps[-1])
    without_feedback = 0.95 * one_delta * 50**0.5  # top-1% drops ~95% of each delta's norm
    assert gaps[-1] < 0.7 * without_feedback
    assert max(gaps[35:]) < 1.25 * max(gaps[15:25])  # bounded: it levels off


def test_block_topk_int2_sums_over_fifty_rounds_are_closer_than_one_round_is():
    gen, feedback = torch.Generator().manual_seed(3), ErrorFeedback()
    zero = {k: torch.zeros(s) for k, s in SHAPES.items()}
    true, sent = dict(zero), dict(zero)
    for round_ in range(50):
        delta = _delta(gen)
        decoded, _ = loads(feedback.encode(delta, {}, "topk:0.01+int2"))
        if round_ == 0:
            one_round = _gap(delta, decoded) / _gap(delta, zero)  # ~0.96: top-1% sends little
        true = {k: true[k] + delta[k] for k in SHAPES}
        sent = {k: sent[k] + decoded[k] for k in SHAPES}
    assert _gap(true, sent) / _gap(true, zero) < 0.75 * one_round
    assert abs(_gap(true, sent) - feedback.residual_norm()) <= DRIFT * (1 + _gap(true, sent))


def test_int8_feedback_keeps_the_residual_at_quantisation_noise():
    gen, feedback = torch.Generator().manual_seed(1), ErrorFeedback()
    for _ in range(20):
        feedback.encode(_delta(gen), {}, "int8")
    one = _gap(_delta(gen), {k: torch.zeros(s) for k, s in SHAPES.items()})
    assert feedback.residual_norm() < 0.02 * one


def test_lossless_codec_keeps_no_residual_and_sends_the_delta_exactly():
    gen, feedback = torch.Generator().manual_seed(2), ErrorFeedback()
    feedback.encode(_delta(gen), {}, "topk:0.01")
    delta = _delta(gen)
    decoded, _ = loads(feedback.encode(delta, {}, "none"))
    assert feedback.residual_norm() == 0.0
    assert all(torch.equal(decoded[k], delta[k]) for k in SHAPES)


def test_residual_resets_when_a_shape_changes():
    feedback = ErrorFeedback()
    feedback.encode({"w": torch.ones(100)}, {}, "topk:0.01")
    before = feedback.residual_norm()
    decoded, _ = loads(feedback.encode({"w": torch.ones(10, 10)}, {}, "topk:0.5"))
    assert before > 0 and decoded["w"].shape == (10, 10)
    assert float(decoded["w"].sum()) == 50.0  # nothing from the old residual leaked in


def test_non_float_tensors_pass_through_without_residual():
    feedback = ErrorFeedback()
    decoded, _ = loads(feedback.encode({"steps": torch.tensor(7), "w": torch.ones(4)}, {}, "int8"))
    assert decoded["steps"].item() == 7 and decoded["steps"].dtype == torch.int64


def test_the_residual_is_kept_in_bfloat16_half_a_float32_model():
    feedback = ErrorFeedback()
    feedback.encode({"w": torch.randn(1000), "b": torch.randn(10)}, {}, "topk:0.1")
    assert {r.dtype for r in feedback._residual.values()} == {RESIDUAL_DTYPE} == {torch.bfloat16}


def test_a_consumable_delta_takes_the_residual_in_place_and_sends_the_same_bytes():
    gen = torch.Generator().manual_seed(4)
    deltas = [torch.randn(5000, generator=gen) for _ in range(3)]
    copied, consumed = ErrorFeedback(), ErrorFeedback()
    for delta in deltas:
        own = Consumable(w=delta.clone())
        storage = own["w"].data_ptr()
        assert copied.encode({"w": delta}, {}, "topk:0.01+int2") == consumed.encode(own, {}, "topk:0.01+int2")
        assert own["w"].data_ptr() == storage and not torch.equal(own["w"], delta)  # overwritten
    assert copied.residual_norm() == consumed.residual_norm() > 0


def test_caller_delta_is_not_modified():
    delta = {"w": torch.randn(500)}
    copy = delta["w"].clone()
    feedback = ErrorFeedback()
    feedback.encode(delta, {}, "topk:0.01+int8")
    feedback.encode(delta, {}, "topk:0.01+int8")
    assert torch.equal(delta["w"], copy)


def test_a_size_policy_sends_small_tensors_exactly_and_keeps_residuals_only_for_large_ones():
    gen, feedback = torch.Generator().manual_seed(6), ErrorFeedback()
    for _ in range(3):
        delta = _delta(gen)
        decoded, _ = loads(feedback.encode(delta, {}, "topk:0.01+int2@4096"))
        assert torch.equal(decoded["b"], delta["b"])  # 64 elements: under the threshold, lossless
    assert "b" not in feedback._residual  # nothing left behind to carry
    assert float(feedback._residual["w"].abs().max()) > 0.0  # 4096 elements: top-k, residual kept
