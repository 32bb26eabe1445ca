"""Aggregation maths against hand-computed values on small tensors."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.merging.strategies import (
    STRATEGY_HELP,
    Krum,
    Strategy,
    StrategyError,
    TensorDict,
    make_strategy,
)

STREAMING = ["fedavg", "fedavgm", "diloco", "fedadam"]
ROBUST = ["median", "trimmed-mean:0.2", "krum:1"]
STATEFUL = ["fedavgm", "diloco", "fedadam"]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def weights(*values: float) -> TensorDict:
    return {"w": t(*values)}


def deltas(*rows: tuple[float, list[float]]) -> list[tuple[float, TensorDict]]:
    return [(samples, {"w": t(*row)}) for samples, row in rows]


def run(strategy: Strategy, start: TensorDict, *rounds: list[tuple[float, TensorDict]]):
    current = {k: v.clone() for k, v in start.items()}
    for round_deltas in rounds:
        current = strategy.aggregate(current, iter(round_deltas))
    return current


def close(actual: torch.Tensor, *expected: float, tol: float = 1e-5) -> bool:
    return torch.allclose(actual, t(*expected), atol=tol, rtol=tol)


# --- fedavg ----------------------------------------------------------------------------------


def test_fedavg_weights_deltas_by_samples():
    strategy = make_strategy("fedavg")
    round_ = deltas((1, [1, 0, 2]), (2, [4, 2, 0]), (1, [-2, 4, 2]))

    new = run(strategy, weights(1, 2, -1), round_)

    # (1*[1,0,2] + 2*[4,2,0] + 1*[-2,4,2]) / 4 = [1.75, 2, 1]
    assert close(new["w"], 2.75, 4.0, 0.0)


def test_fedavg_scales_the_mean_by_server_lr():
    strategy = make_strategy("fedavg", server_lr=0.5)
    round_ = deltas((1, [1, 0, 2]), (2, [4, 2, 0]), (1, [-2, 4, 2]))

    new = run(strategy, weights(1, 2, -1), round_)

    assert close(new["w"], 1.875, 3.0, -0.5)


def test_fedavg_is_dragged_by_a_x1000_outlier():
    strategy = make_strategy("fedavg")
    round_ = deltas((1, [1.0]), (1, [1.2]), (1, [0.8]), (1, [1.1]), (1, [1000.0]))

    new = run(strategy, weights(0), round_)

    assert close(new["w"], 200.82, tol=1e-4)


@given(
    st.lists(
        st.tuples(st.integers(1, 100), st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3)),
        min_size=1,
        max_size=6,
    )
)
@settings(max_examples=40, deadline=None)
def test_fedavg_matches_a_float64_weighted_mean(rows):
    strategy = make_strategy("fedavg")

    new = run(strategy, weights(0, 0, 0), deltas(*rows))

    total = sum(s for s, _ in rows)
    expected = [sum(s * row[i] for s, row in rows) / total for i in range(3)]
    assert torch.allclose(
        new["w"].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-3, rtol=1e-5
    )


# --- outer SGD with Nesterov momentum (fedavgm, diloco) ---------------------------------------

ROUND_A = deltas((1, [2, -4]), (1, [0, 0]))  # mean a = [1, -2]
ROUND_B = deltas((1, [0.5, 0]), (3, [0.5, 0]))  # mean b = [0.5, 0]


def test_fedavgm_applies_nesterov_momentum_over_two_rounds():
    strategy = make_strategy("fedavgm")  # lr 1.0, momentum 0.9

    after_one = run(strategy, weights(0, 0), ROUND_A)
    after_two = strategy.aggregate(after_one, iter(ROUND_B))

    # round 1: buf = a; w += a + 0.9 buf = 1.9 a = [1.9, -3.8]
    # round 2: buf = 0.9 a + b; w += b + 0.9 buf = 1.9 b + 0.81 a = [1.76, -1.62]
    assert close(after_two["w"], 3.66, -5.42)


def test_diloco_uses_lr_0_7_and_momentum_0_9_over_two_rounds():
    strategy = make_strategy("diloco")

    after_one = run(strategy, weights(0, 0), ROUND_A)
    assert close(after_one["w"], 1.33, -2.66)  # 0.7 * 1.9 a
    after_two = strategy.aggregate(after_one, iter(ROUND_B))

    assert close(after_two["w"], 1.33 + 1.232, -2.66 - 1.134)  # + 0.7 (1.9 b + 0.81 a)


def test_diloco_matches_torch_sgd_nesterov_on_the_pseudo_gradient():
    strategy = make_strategy("diloco", server_lr=0.3, momentum=0.8)
    param = torch.zeros(2, requires_grad=True)
    sgd = torch.optim.SGD([param], lr=0.3, momentum=0.8, nesterov=True)

    new = run(strategy, weights(0, 0), ROUND_A, ROUND_B, ROUND_A)
    for mean in (t(1, -2), t(0.5, 0), t(1, -2)):
        param.grad = -mean
        sgd.step()

    assert torch.allclose(new["w"], param.detach(), atol=1e-6)


# --- delayed Nesterov (asynchronous runs) ---------------------------------------------------


def test_delayed_momentum_moves_once_every_n_merges_by_their_average():
    strategy = make_strategy("fedavgm", momentum_delay=2)  # lr 1.0, momentum 0.9

    after_one = run(strategy, weights(0, 0), ROUND_A)
    assert close(after_one["w"], 1, -2)  # a plain step: the momentum has not moved yet
    after_two = strategy.aggregate(after_one, iter(ROUND_B))

    # merge 2: the plain step b, then buf = (a + b) / 2 and w += 0.9 buf
    assert close(after_two["w"], 1 + 0.5 + 0.9 * 0.75, -2 + 0 + 0.9 * -1.0)
    after_three = strategy.aggregate(after_two, iter(ROUND_A))
    assert close(after_three["w"], 2.175 + 1, -2.9 - 2)  # plain again: the next move is at merge 4


def test_a_momentum_delay_of_one_is_plain_nesterov():
    delayed = run(make_strategy("diloco", momentum_delay=1), weights(0, 0), ROUND_A, ROUND_B, ROUND_A)
    plain = run(make_strategy("diloco"), weights(0, 0), ROUND_A, ROUND_B, ROUND_A)
    assert torch.equal(delayed["w"], plain["w"])


def test_one_stale_merge_moves_delayed_momentum_less_than_plain():
    stale = deltas((1, [10.0, 10.0]))  # one buffer far off the others' direction
    plain = make_strategy("diloco")
    delayed = make_strategy("diloco", momentum_delay=4)
    run(plain, weights(0, 0), ROUND_A, stale)
    run(delayed, weights(0, 0), ROUND_A, stale, ROUND_A, ROUND_A)
    carried = {name: s.state_dict()["momentum/w"] for name, s in (("plain", plain), ("delayed", delayed))}
    assert carried["delayed"].norm() < carried["plain"].norm() / 2


def test_delayed_momentum_restored_mid_cycle_continues_identically():
    original = make_strategy("diloco", momentum_delay=3)
    after_one = run(original, weights(0, 0), ROUND_A)
    restarted = make_strategy("diloco", momentum_delay=3)
    restarted.load_state_dict(original.state_dict())

    continued = run(original, after_one, ROUND_B, ROUND_A)
    resumed = run(restarted, after_one, ROUND_B, ROUND_A)

    assert torch.equal(continued["w"], resumed["w"])
    assert int(restarted.state_dict()["steps/since_momentum"]) == 0


def test_a_momentum_delay_below_one_is_refused():
    with pytest.raises(StrategyError, match="delay"):
        make_strategy("fedavgm", momentum_delay=0)


# --- fedadam ---------------------------------------------------------------------------------


def test_fedadam_takes_adaptive_steps_over_two_rounds():
    strategy = make_strategy("fedadam")  # lr 0.01, b1 0.9, b2 0.99, tau 1e-3
    lr, tau = 0.01, 1e-3

    after_one = run(strategy, weights(0, 0), deltas((1, [1.0, -0.5])))
    after_two = strategy.aggregate(after_one, iter(deltas((1, [1.0, 0.0]))))

    m1, v1 = [0.1, -0.05], [0.01, 0.0025]
    step1 = [lr * m / (math.sqrt(v) + tau) for m, v in zip(m1, v1, strict=True)]
    m2 = [0.9 * m1[0] + 0.1 * 1.0, 0.9 * m1[1]]
    v2 = [0.99 * v1[0] + 0.01 * 1.0, 0.99 * v1[1]]
    step2 = [lr * m / (math.sqrt(v) + tau) for m, v in zip(m2, v2, strict=True)]
    assert close(after_two["w"], step1[0] + step2[0], step1[1] + step2[1], tol=1e-6)


# --- state across restarts -------------------------------------------------------------------


@pytest.mark.parametrize("spec", STATEFUL)
def test_restored_state_continues_identically(spec):
    original = make_strategy(spec)
    after_one = run(original, weights(0, 0), ROUND_A)
    saved = original.state_dict()
    restarted = make_strategy(spec)
    restarted.load_state_dict(saved)

    continued = run(original, after_one, ROUND_B)
    resumed = run(restarted, after_one, ROUND_B)
    forgetful = run(make_strategy(spec), after_one, ROUND_B)

    assert torch.equal(continued["w"], resumed["w"])
    assert not torch.allclose(continued["w"], forgetful["w"])


def test_state_dict_is_a_flat_map_of_named_copies():
    strategy = make_strategy("fedadam")
    run(strategy, weights(0, 0), ROUND_A)

    state = strategy.state_dict()
    state["adam_m/w"].fill_(99)

    assert set(state) == {"adam_m/w", "adam_v/w"}
    assert not torch.equal(strategy.state_dict()["adam_m/w"], state["adam_m/w"])


def test_load_state_dict_refuses_foreign_keys():
    with pytest.raises(StrategyError, match="adam_m/w"):
        make_strategy("diloco").load_state_dict({"adam_m/w": t(1, 2)})
    with pytest.raises(StrategyError, match="no state"):
        make_strategy("fedavg").load_state_dict({"momentum/w": t(1, 2)})


def test_state_of_the_wrong_shape_is_refused_at_aggregation():
    strategy = make_strategy("fedavgm")
    strategy.load_state_dict({"momentum/w": t(1, 2, 3)})

    with pytest.raises(StrategyError, match="does not match"):
        run(strategy, weights(0, 0), ROUND_A)


# --- streaming -------------------------------------------------------------------------------


def _tracked(alive: list[weakref.ref], i: int) -> tuple[float, TensorDict]:
    tensor = torch.full((4,), float(i))
    alive.append(weakref.ref(tensor))
    return 1.0, {"w": tensor}


def _lazy(n: int, alive: list[weakref.ref], pulled: list[int]) -> Iterator[tuple[float, TensorDict]]:
    for i in range(n):
        assert all(ref() is None for ref in alive), "an earlier delta is still referenced"
        pulled.append(i)
        yield _tracked(alive, i)


@pytest.mark.parametrize("spec", STREAMING)
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_streaming_strategies_hold_one_delta_at_a_time(spec, clip_norm):
    strategy = make_strategy(spec, clip_norm=clip_norm)
    alive: list[weakref.ref] = []
    pulled: list[int] = []

    strategy.aggregate({"w": torch.zeros(4)}, _lazy(6, alive, pulled))

    assert strategy.streaming
    assert pulled == list(range(6))


@pytest.mark.parametrize("spec", ROBUST)
def test_robust_strategies_say_they_need_all_deltas(spec):
    strategy = make_strategy(spec)

    entry = _help_entry(spec.split(":")[0])

    assert not strategy.streaming
    assert "needs all deltas in memory" in entry


@pytest.mark.parametrize("spec", STREAMING)
def test_streaming_strategies_do_not_claim_to_need_all_deltas(spec):
    assert "needs all deltas" not in _help_entry(spec)


def _help_entry(name: str) -> str:
    """The help line starting with ``name`` plus its indented continuation lines."""
    entry: list[str] = []
    for line in STRATEGY_HELP.splitlines():
        starts = line.startswith((name + " ", name + ":"))
        if starts or (entry and line.startswith(" ")):
            entry.append(line)
        elif entry:
            break
    return " ".join(entry)


@pytest.mark.parametrize("spec", STREAMING + ROBUST)
def test_an_empty_round_leaves_weights_and_state_unchanged(spec):
    strategy = make_strategy(spec)

    new = strategy.aggregate(weights(1, 2), iter([]))

    assert torch.equal(new["w"], t(1, 2))
    assert strategy.state_dict() == {}


@pytest.mark.parametrize("spec", STREAMING + ROBUST)
def test_integer_buffers_keep_the_weights_values(spec):
    strategy = make_strategy(spec)
    start = {"w": t(1, 2), "steps": torch.tensor(7)}
    round_ = [(1.0, {"w": t(1, 1), "steps": torch.tensor(100)}) for _ in range(3)]

    new = strategy.aggregate(start, iter(round_))

    assert new["steps"].item() == 7
    assert not torch.equal(new["w"], t(1, 2))


def test_a_delta_of_the_wrong_shape_is_refused_not_broadcast():
    with pytest.raises(StrategyError, match="shape"):
        run(make_strategy("fedavg"), weights(0, 0), deltas((1, [5])))


def test_negative_sample_weights_are_refused():
    with pytest.raises(StrategyError, match="sample weight"):
        run(make_strategy("fedavg"), weights(0, 0), deltas((-1, [1, 1])))


# --- clipping --------------------------------------------------------------------------------


def test_clip_norm_scales_long_deltas_and_keeps_short_ones():
    strategy = make_strategy("fedavg", clip_norm=1.0)
    round_ = deltas((1, [3, 4]), (1, [0.3, 0.4]))  # norms 5 -> clipped to 1, and 0.5

    new = run(strategy, weights(0, 0), round_)

    assert close(new["w"], (0.6 + 0.3) / 2, (0.8 + 0.4) / 2)


def test_clip_norm_applies_to_robust_strategies_too():
    strategy = make_strategy("median", clip_norm=1.0)
    round_ = deltas((1, [30, 40]), (1, [0.3, 0.4]), (1, [6, 8]))  # clipped: [.6,.8] [.3,.4] [.6,.8]

    new = run(strategy, weights(0, 0), round_)

    assert close(new["w"], 0.6, 0.8)


# --- robust strategies -----------------------------------------------------------------------


def test_median_takes_the_middle_value_per_coordinate():
    new = run(make_strategy("median"), weights(0, 0), deltas((1, [1, 5]), (9, [2, -1]), (1, [3, 0])))

    assert close(new["w"], 2, 0)


def test_median_of_an_even_count_averages_the_two_middle_values():
    round_ = deltas((1, [1, 2]), (1, [1.2, 2.2]), (1, [0.8, 1.8]), (1, [1000, 2000]))

    new = run(make_strategy("median"), weights(0, 0), round_)

    assert close(new["w"], 1.1, 2.1)


def test_trimmed_mean_drops_the_extremes_and_resists_a_x1000_outlier():
    round_ = deltas((1, [1.0]), (1, [1.2]), (1, [0.8]), (1, [1.1]), (1, [1000.0]))

    new = run(make_strategy("trimmed-mean:0.2"), weights(0), round_)

    assert close(new["w"], 1.1)  # mean of 1.0, 1.1, 1.2


def test_trimmed_mean_with_b_0_is_the_unweighted_mean():
    new = run(make_strategy("trimmed-mean:0"), weights(0), deltas((1, [1]), (5, [2]), (1, [6])))

    assert close(new["w"], 3)


def test_krum_averages_the_n_minus_f_best_scored_by_samples():
    strategy = make_strategy("krum:1")
    # squared-distance scores over 2 neighbours: 5, 2, 2, 5, 113 -> keep the first four
    round_ = deltas((2, [0, 0]), (1, [1, 0]), (1, [2, 0]), (1, [3, 0]), (1, [10, 0]))

    new = run(strategy, weights(0, 0), round_)

    assert isinstance(strategy, Krum)
    assert strategy.last_selected == [0, 1, 2, 3]
    assert close(new["w"], (0 * 2 + 1 + 2 + 3) / 5, 0)


def test_krum_picks_the_honest_cluster_when_one_delta_is_scaled_x1000():
    honest = [[1, 1, 1, 1], [1.1, 0.9, 1, 1], [0.9, 1.1, 1, 1], [1, 1, 1.1, 0.9]]
    attacker = [1000 * x for x in [1, 1, 0.9, 1.1]]
    strategy = make_strategy("krum:1")

    new = run(strategy, weights(0, 0, 0, 0), deltas(*[(1, row) for row in honest], (1, attacker)))

    assert strategy.last_selected == [0, 1, 2, 3]
    assert close(new["w"], 1, 1, 1.025, 0.975)


def test_krum_with_too_few_deltas_for_f_keeps_the_n_minus_f_closest():
    strategy = make_strategy("krum:2")  # 5 deltas <= 2F+2: one neighbour each, keep 3
    round_ = deltas((1, [0.0]), (1, [0.1]), (1, [0.2]), (1, [0.3]), (1, [1000.0]))

    run(strategy, weights(0), round_)

    assert len(strategy.last_selected) == 3
    assert 4 not in strategy.last_selected


def test_krum_with_two_deltas_averages_both():
    strategy = make_strategy("krum:1")

    new = run(strategy, weights(0), deltas((1, [1.0]), (1, [3.0])))

    assert close(new["w"], 2.0)


# --- make_strategy ---------------------------------------------------------------------------


def test_make_strategy_names_canonical_specs_and_defaults():
    diloco, fedavgm, fedadam = (make_strategy(s) for s in ("diloco", "FedAvgM", "fedadam"))

    assert (diloco.server_lr, diloco.momentum) == (0.7, 0.9)  # type: ignore[attr-defined]
    assert (fedavgm.server_lr, fedavgm.momentum) == (1.0, 0.9)  # type: ignore[attr-defined]
    assert fedadam.server_lr == 0.01
    assert make_strategy(" Krum:2 ").name == "krum:2"
    assert make_strategy("trimmed-mean:0.10").name == "trimmed-mean:0.1"


@pytest.mark.parametrize(
    ("spec", "options", "fragment"),
    [
        ("foo", {}, "unknown strategy 'foo': expected fedavg, fedavgm"),
        ("trimmed-mean", {}, "trimmed-mean:B (0 <= B < 0.5)"),
        ("trimmed-mean:0.5", {}, "bad strategy 'trimmed-mean:0.5'"),
        ("trimmed-mean:abc", {}, "0 <= B < 0.5"),
        ("krum:-1", {}, "F must be an integer >= 0"),
        ("krum:1.5", {}, "bad strategy 'krum:1.5'"),
        ("fedavg:2", {}, "takes no parameter"),
        ("median", {"momentum": 0.9}, "has no momentum"),
        ("fedavg", {"server_lr": 0.0}, "server_lr must be a positive"),
        ("diloco", {"momentum": 1.0}, "momentum must satisfy"),
        ("fedavg", {"clip_norm": -1.0}, "clip_norm must be a positive"),
    ],
)
def test_make_strategy_rejects_bad_specs_with_the_valid_forms(spec, options, fragment):
    with pytest.raises(StrategyError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_strategy(spec, **options)


def test_strategy_error_is_a_value_error():
    assert issubclass(StrategyError, ValueError)
