"""Tests for volunteer.trainer: local training on one shard, returned as a delta."""

from __future__ import annotations

import math
import pathlib
from copy import deepcopy

import pytest
import torch

from jobs import load_job, reuses_model
from jobs.charlm import make_job
from volunteer.trainer import GRAD_CLIP_NORM, ShardResult, seed_for, train_shard

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fixture_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the small job modules in tests/fixtures importable by bare name."""
    monkeypatch.syspath_prepend(str(FIXTURES))


def initial_weights(job: object) -> dict[str, torch.Tensor]:
    """The job's initial model weights, as the coordinator would send them."""
    return job.build_model().state_dict()  # type: ignore[attr-defined]


def train(job: object, weights: dict[str, torch.Tensor], **overrides: object) -> ShardResult:
    """train_shard with small defaults for tests."""
    kwargs: dict = {
        "shard": 0,
        "shards": 2,
        "steps": 3,
        "lr": 1e-2,
        "optimizer": "adamw",
        "device": CPU,
        "seed": 5,
    }
    kwargs.update(overrides)
    return train_shard(job, weights, **kwargs)  # type: ignore[arg-type]


def test_one_sgd_step_delta_is_local_minus_initial() -> None:
    job = load_job("jobs_tiny:make_job")
    weights = initial_weights(job)
    model = job.build_model()
    torch.manual_seed(11)
    job.loss(model, next(iter(job.shard(0, 2)))).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
    expected = {name: -0.1 * p.grad for name, p in model.named_parameters()}

    result = train(job, weights, steps=1, lr=0.1, optimizer="sgd", seed=11)

    assert result.delta.keys() == expected.keys()
    for name, delta in result.delta.items():
        torch.testing.assert_close(delta, expected[name])


def test_training_reports_finite_loss_samples_steps_and_time() -> None:
    job = load_job("jobs_tiny:make_job", {"batch_size": 8})

    result = train(job, initial_weights(job), steps=4)

    assert math.isfinite(result.train_loss)
    assert result.samples == 32
    assert result.steps == 4
    assert result.seconds > 0
    assert all(d.dtype == torch.float32 and d.device == CPU for d in result.delta.values())


def test_same_seed_gives_an_identical_delta_and_another_seed_a_different_one() -> None:
    job = load_job("jobs_tiny:make_job")
    weights = initial_weights(job)

    first, again = train(job, weights, seed=1), train(job, weights, seed=1)
    other = train(job, weights, seed=2)

    assert all(torch.equal(first.delta[k], again.delta[k]) for k in first.delta)
    assert not torch.equal(first.delta["weight"], other.delta["weight"])


def test_training_leaves_the_weights_passed_in_untouched() -> None:
    job = load_job("jobs_tiny:make_job")
    weights = initial_weights(job)
    saved = {k: v.clone() for k, v in weights.items()}

    train(job, weights)

    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_a_nan_loss_stops_training_and_reports_a_non_finite_result() -> None:
    job = load_job("jobs_nan:make_job")

    result = train(job, initial_weights(job), steps=5)

    non_finite_delta = any(not torch.isfinite(d).all() for d in result.delta.values())
    assert not math.isfinite(result.train_loss) or non_finite_delta
    assert result.steps < 5


def test_a_finite_shard_iterable_is_cycled_for_all_steps() -> None:
    job = load_job("jobs_tiny:make_job", {"finite": 2, "batch_size": 4})

    result = train(job, initial_weights(job), steps=5)

    assert result.steps == 5
    assert result.samples == 20


def test_dict_batches_are_moved_and_counted() -> None:
    job = load_job("jobs_tiny:make_job", {"as_dict": True, "batch_size": 6})

    result = train(job, initial_weights(job), steps=2)

    assert result.samples == 12
    assert math.isfinite(result.train_loss)


def test_an_unknown_optimizer_is_refused_naming_the_choices() -> None:
    job = load_job("jobs_tiny:make_job")

    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'.*adamw, sgd"):
        train(job, initial_weights(job), optimizer="lion")


def test_charlm_local_steps_lower_the_loss_on_the_shard(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    job = make_job(layers=1, width=32, heads=2, context=16, batch_size=8, corpus=str(tmp_path / "*.txt"))
    weights = initial_weights(job)
    model = job.build_model()
    torch.manual_seed(99)
    batch = next(iter(job.shard(0, 1)))
    with torch.no_grad():
        before = float(job.loss(model, batch))

    result = train(job, weights, shards=1, steps=20, lr=3e-3)
    model.load_state_dict({k: weights[k] + result.delta[k] for k in weights})

    with torch.no_grad():
        after = float(job.loss(model, batch))
    assert after < before - 0.5
    assert result.train_loss < before


def test_seed_for_is_stable_and_differs_by_run_round_and_shard() -> None:
    seeds = {
        seed_for("demo", 1, 0),
        seed_for("demo", 2, 0),
        seed_for("demo", 1, 1),
        seed_for("other", 1, 0),
    }

    assert seed_for("demo", 1, 0) == 7645509673246013323  # pinned: volunteers must agree
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_samples_never_exceed_what_the_job_declares_per_step():
    class Plain:  # the tiny job without a batch_size: one sample per step
        name = "plain"

        def __init__(self):
            self.inner = load_job("tests.fixtures.jobs_tiny:make_job")

        def build_model(self):
            return self.inner.build_model()

        def shard(self, index, count):
            return self.inner.shard(index, count)

        def loss(self, model, batch):
            return self.inner.loss(model, batch)

        def evaluate(self, model):
            return self.inner.evaluate(model)

    job = Plain()
    weights = job.build_model().state_dict()
    result = train_shard(
        job, weights, shard=0, shards=1, steps=3, lr=0.01, device=torch.device("cpu"), seed=0
    )
    assert result.samples == 3


def test_a_time_budget_stops_training_after_at_least_one_step(monkeypatch):
    monkeypatch.setenv("CROWDTRAIN_TEST_STEP_SECONDS", "0.05")
    job = load_job("tests.fixtures.jobs_slow:make_job")
    weights = job.build_model().state_dict()
    common = dict(shard=0, shards=1, steps=1000, lr=0.01, device=torch.device("cpu"), seed=0)
    budgeted = train_shard(job, weights, seconds=0.3, **common)
    assert 1 <= budgeted.steps < 100 and budgeted.samples == 8 * budgeted.steps
    assert train_shard(job, weights, seconds=1e-9, **common).steps == 1


def test_a_kept_inner_state_goes_on_from_the_previous_shards_moments_and_steps() -> None:
    job = load_job("jobs_tiny:make_job")
    weights = initial_weights(job)
    first = train(job, weights, steps=3)
    steps = [float(s["step"]) for s in first.optimizer_state["state"].values()]
    assert steps and all(s == 3 for s in steps)
    kept = train(job, weights, steps=3, seed=6, optimizer_state=first.optimizer_state)
    assert all(float(s["step"]) == 6 for s in kept.optimizer_state["state"].values())
    # AdamW's first steps are sign-like; from warm moments the same batches move the model otherwise
    fresh = train(job, weights, steps=3, seed=6)
    assert not torch.equal(kept.delta["weight"], fresh.delta["weight"])


def test_an_inner_state_that_does_not_fit_the_model_is_ignored() -> None:
    small, other = load_job("jobs_tiny:make_job"), load_job("jobs_tiny:make_job", {"features": 7})
    foreign = train(other, initial_weights(other), steps=2).optimizer_state
    weights = initial_weights(small)
    resumed = train(small, weights, steps=3, optimizer_state=foreign)
    torch.testing.assert_close(resumed.delta["weight"], train(small, weights, steps=3).delta["weight"])


@pytest.mark.parametrize("preset", ["charlm", "gpt"])
def test_a_model_reused_shard_after_shard_trains_exactly_as_a_new_build(tmp_path, preset) -> None:
    """``reuse_model`` jobs: the next shard loads over the trained model (delta and all), same result."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    args = {"corpus": str(tmp_path / "*.txt"), "batch_size": 4}
    shape = {"layers": 1, "width": 32, "heads": 2, "context": 16}
    job = load_job(preset, {**args, **shape} if preset == "charlm" else {**args, "preset": "nano"})
    assert reuses_model(job)
    start = initial_weights(job)
    first = train(job, start, shards=1, seed=1)
    later = {k: start[k] + first.delta[k] for k in start}  # the next version, another shard

    model = job.build_model()
    train(job, start, shards=1, seed=1, model=model)  # the delta is now in model's parameters
    # (a resumed optimizer steps its state's tensors in place: each run gets its own copy)
    reused = train(job, later, shards=1, seed=2, model=model, optimizer_state=deepcopy(first.optimizer_state))
    fresh = train(job, later, shards=1, seed=2, optimizer_state=deepcopy(first.optimizer_state))

    assert reused.train_loss == fresh.train_loss
    assert all(torch.equal(reused.delta[k], fresh.delta[k]) for k in fresh.delta)


def test_weight_decay_shrinks_matrices_but_not_biases_or_norm_gains() -> None:
    """nanoGPT's rule: with zero gradients, AdamW's decay alone moves a weight matrix, never a bias."""

    class Still:
        name = "still"

        def build_model(self) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

        def shard(self, index: int, count: int):
            while True:
                yield torch.ones(2, 4)

        def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            return model(batch).sum() * 0.0  # no gradient: only the decay moves anything

        def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
            return {"eval_loss": 0.0}

    job = Still()
    weights = {k: v + 1.0 for k, v in initial_weights(job).items()}
    delta = train(job, weights, steps=5).delta
    assert delta["0.weight"].abs().max() > 0
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.count_nonzero(delta[name]) == 0, name


def test_a_jobs_parameter_groups_are_used_and_checked() -> None:
    job = load_job("jobs_tiny:make_job")
    model = job.build_model()
    params = list(model.parameters())

    job.parameter_groups = lambda m: [{"params": list(m.parameters()), "weight_decay": 0.5}]
    delta = train(job, initial_weights(job), steps=2).delta
    assert all(torch.isfinite(t).all() for t in delta.values())

    from jobs import JobError, parameter_groups

    assert parameter_groups(job, model)[0]["weight_decay"] == 0.5
    job.parameter_groups = lambda m: [{"params": params[:1]}]  # misses the rest
    with pytest.raises(JobError, match="exactly once"):
        parameter_groups(job, model)
    job.parameter_groups = lambda m: [{"params": list(m.parameters())}, {"params": params[:1]}]
    with pytest.raises(JobError, match="exactly once"):
        parameter_groups(job, model)
