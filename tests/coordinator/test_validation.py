"""Each check on an untrusted delta or summary gives its own short reason."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.rounds.validation import (
    accepted_norm,
    check_delta,
    check_meta,
    delta_norm,
    norm_outliers,
    printable,
    screen_norms,
)

REFERENCE = {"a": ((2,), torch.float32), "b": ((2, 2), torch.float32), "n": ((), torch.int64)}


def good_delta() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([0.5, -1.0]), "b": torch.ones(2, 2), "n": torch.tensor(3)}


def good_meta(**changes: object) -> dict[str, object]:
    return {"samples": 64, "base_version": 4, "train_loss": 2.5, "steps": 8} | changes


# --- check_delta -----------------------------------------------------------------------------


def test_a_well_formed_delta_passes():
    assert check_delta(good_delta(), REFERENCE) is None


def test_a_missing_tensor_is_named():
    delta = good_delta()
    del delta["b"]

    assert check_delta(delta, REFERENCE) == "missing tensors: 'b'"


def test_an_unexpected_tensor_is_named():
    delta = good_delta() | {"evil": torch.zeros(1)}

    assert check_delta(delta, REFERENCE) == "unexpected tensors: 'evil'"


def test_many_unexpected_tensors_are_summarised():
    delta = good_delta() | {f"x{i}": torch.zeros(1) for i in range(5)}

    assert check_delta(delta, REFERENCE) == "unexpected tensors: 'x0', 'x1', 'x2' (+2 more)"


def test_a_wrong_shape_gives_both_shapes():
    delta = good_delta() | {"b": torch.ones(4)}

    assert check_delta(delta, REFERENCE) == "'b' has shape (4,), expected (2, 2)"


def test_a_wrong_dtype_gives_both_dtypes():
    delta = good_delta() | {"a": torch.zeros(2, dtype=torch.float16)}

    assert check_delta(delta, REFERENCE) == "'a' has dtype float16, expected float32"


def test_a_value_that_is_not_a_tensor_is_refused():
    delta = good_delta() | {"a": [0.0, 1.0]}

    assert check_delta(delta, REFERENCE) == "'a' is not a dense tensor"  # type: ignore[arg-type]


def test_a_delta_that_is_not_a_map_is_refused():
    assert check_delta([torch.zeros(2)], REFERENCE) == "delta is not a map of tensors"  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_anywhere_gives_non_finite_values(bad):
    delta = good_delta()
    delta["b"][1, 0] = bad

    assert check_delta(delta, REFERENCE) == "non-finite values"


def test_plus_and_minus_inf_together_are_non_finite():
    delta = good_delta()
    delta["a"] = torch.tensor([math.inf, -math.inf])

    assert check_delta(delta, REFERENCE) == "non-finite values"


def test_huge_finite_values_whose_sum_overflows_are_still_finite():
    delta = good_delta() | {"a": torch.tensor([3e38, 3e38])}

    assert check_delta(delta, REFERENCE) is None


# --- check_meta ------------------------------------------------------------------------------


def test_a_well_formed_summary_passes():
    assert check_meta(good_meta(), base_version=4, max_samples=1000) is None


def test_a_missing_train_loss_or_null_one_passes():
    meta = good_meta()
    del meta["train_loss"]

    assert check_meta(meta, base_version=4, max_samples=1000) is None
    assert check_meta(good_meta(train_loss=None), base_version=4, max_samples=1000) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"samples": None}, "missing samples"),
        ({"samples": "64"}, "samples must be an integer, got str"),
        ({"samples": True}, "samples must be an integer, got bool"),
        ({"samples": 64.0}, "samples must be an integer, got float"),
        ({"samples": 0}, "samples must be positive, got 0"),
        ({"samples": 5000}, "samples 5000 exceeds the limit 1000"),
        ({"base_version": None}, "missing base_version"),
        ({"base_version": "4"}, "base_version must be an integer, got str"),
        ({"base_version": 3}, "base_version 3 does not match the round's 4"),
        ({"train_loss": math.nan}, "train_loss is not finite"),
        ({"train_loss": math.inf}, "train_loss is not finite"),
        ({"train_loss": "low"}, "train_loss must be a number or null, got str"),
    ],
)
def test_each_bad_summary_field_has_its_reason(changes, reason):
    assert check_meta(good_meta(**changes), base_version=4, max_samples=1000) == reason


def test_a_summary_that_is_not_a_map_is_refused():
    assert check_meta([64], base_version=4, max_samples=1000) == "meta is not a map"  # type: ignore[arg-type]


# --- delta_norm ------------------------------------------------------------------------------


def test_delta_norm_is_the_global_l2_norm_over_float_tensors():
    delta = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0]), "n": torch.tensor(99)}

    assert delta_norm(delta) == pytest.approx(13.0)


def test_delta_norm_is_accurate_on_a_large_tensor():
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(2_000_003, generator=generator) + 3.0

    expected = torch.linalg.vector_norm(big.double()).item()

    assert delta_norm({"x": big}) == pytest.approx(expected, rel=1e-6)  # float32 rows, f64 sum


def test_delta_norm_survives_values_whose_float32_squares_overflow():
    assert delta_norm({"x": torch.tensor([1e30, 1e30])}) == pytest.approx(math.sqrt(2) * 1e30)


# --- norm_outliers ---------------------------------------------------------------------------


def test_a_norm_far_above_the_round_median_is_flagged():
    norms = {0: 1.0, 1: 1.0, 2: 0.9, 3: 1.2, 7: 1234.5}

    flagged = norm_outliers(norms, max_ratio=10)

    assert flagged == {7: "norm 1234.5 is 1234.5x the round median (limit 10x)"}


def test_norms_within_the_ratio_are_not_flagged():
    assert norm_outliers({0: 1.0, 1: 5.0, 2: 9.9}, max_ratio=10) == {}


def test_fewer_than_three_norms_are_never_flagged():
    assert norm_outliers({0: 1.0, 1: 1e6}, max_ratio=10) == {}


def test_a_non_finite_norm_is_flagged():
    flagged = norm_outliers({0: 1.0, 1: 1.0, 2: math.inf}, max_ratio=10)

    assert flagged == {2: "non-finite norm"}


def test_with_a_zero_median_any_nonzero_norm_is_flagged():
    flagged = norm_outliers({0: 0.0, 1: 0.0, 2: 0.5}, max_ratio=10)

    assert flagged == {2: "norm 0.5 with a round median of 0"}


def test_a_non_positive_ratio_is_a_programming_error():
    with pytest.raises(ValueError, match="max_ratio"):
        norm_outliers({0: 1.0, 1: 1.0, 2: 1.0}, max_ratio=0)


# --- one voice per volunteer, and the model's scale for small rounds ------------------------
def test_a_volunteer_with_many_shards_does_not_move_the_yardstick():
    # mallory's five huge shards would be the median of all eight norms; as one voice they are not
    norms = {0: 1.0, 1: 1.1, 2: 0.9, 3: 50.0, 4: 50.0, 5: 50.0, 6: 50.0, 7: 50.0}
    owners = {0: "ann", 1: "ben", 2: "cid", 3: "mal", 4: "mal", 5: "mal", 6: "mal", 7: "mal"}
    flagged = screen_norms(norms, owners, max_ratio=10)
    assert sorted(flagged) == [3, 4, 5, 6, 7]


def test_with_fewer_than_three_voices_and_no_history_the_model_norm_is_the_yardstick():
    flagged = screen_norms({0: 1.0, 1: 500.0}, {0: "ann", 1: "mal"}, max_ratio=10, model_norm=20.0)
    assert list(flagged) == [1] and "model's norm" in flagged[1]
    assert screen_norms({0: 1.0, 1: 500.0}, {0: "ann", 1: "mal"}, max_ratio=10) == {}


def test_a_model_at_zero_is_not_screened_by_its_norm_but_by_the_voices_merged_before():
    """The issue's sparse model starts at zero: every honest delta was '5.56 with a model's norm of 0'."""
    two = {0: "ann", 1: "ben"}
    assert screen_norms({0: 5.56, 1: 5.3}, two, max_ratio=10, model_norm=0.0) == {}
    history = [5.4, 4.9, 5.1]  # the voices merged in earlier rounds
    assert screen_norms({0: 5.56, 1: 5.3}, two, max_ratio=10, model_norm=0.0, history=history) == {}
    flagged = screen_norms({0: 5.56, 1: 900.0}, two, max_ratio=10, model_norm=0.0, history=history)
    assert list(flagged) == [1] and "recently merged voices" in flagged[1]


def test_the_history_not_the_model_norm_screens_small_rounds_of_tiny_and_of_large_models():
    # a 17-parameter model of norm 0.5 whose honest deltas are 2.4 (measured on the linear job)
    assert screen_norms({0: 2.4}, {0: "ann"}, max_ratio=10, model_norm=0.5, history=[2.0, 2.5]) == {}
    # a large model of norm 1000 whose honest deltas are about 1: a lone 50x delta is caught
    flagged = screen_norms({0: 50.0}, {0: "mal"}, max_ratio=10, model_norm=1000.0, history=[1.0, 1.2, 0.9])
    assert list(flagged) == [0]


def test_a_round_adds_its_voices_lower_median_to_the_history():
    assert accepted_norm([1.0, 9.0]) == 1.0  # a wild voice merged beside an honest one: not the history
    assert accepted_norm([3.0]) == 3.0 and accepted_norm([1.0, 2.0, 30.0]) == 2.0
    assert accepted_norm([]) is None


def test_text_from_volunteers_is_escaped_and_capped_before_logs_and_json():
    assert printable("fine\nFAKE LOG LINE\x1b[31m") == "fine\\nFAKE LOG LINE\\x1b[31m"
    assert len(printable("x" * 10_000)) == 200
