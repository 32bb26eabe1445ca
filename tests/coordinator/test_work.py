"""coordinator.merging.work: the trusted replay is the volunteer's training; the rates make cheating lose."""

from __future__ import annotations

import torch

from coordinator.merging import work
from tests.fixtures.jobs_tiny import make_job
from volunteer.trainer import seed_for, train_shard


def test_the_trusted_replay_of_a_shard_is_the_volunteers_training_and_a_lazy_one_fails() -> None:
    job = make_job()
    base = job.build_model().state_dict()
    seed = seed_for("r", 3, 5)
    honest = train_shard(
        job, base, shard=2, shards=3, steps=10, lr=0.01, device=torch.device("cpu"), seed=seed
    )
    lazy = train_shard(job, base, shard=2, shards=3, steps=1, lr=0.01, device=torch.device("cpu"), seed=seed)
    state = torch.random.get_rng_state()
    replayed, samples = work.replay(
        job, base, shard=5, shards=3, steps=10, lr=0.01, optimizer="adamw", seed=seed
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert samples == honest.samples
    assert all(torch.allclose(honest.delta[k], replayed[k], atol=1e-7) for k in replayed)
    assert work.mismatch(honest.delta, replayed, "topk:0.01+int2@4096") is None
    assert "norm" in str(work.mismatch(lazy.delta, replayed, "none"))


def test_every_check_rate_makes_cheating_one_shard_a_losing_bet() -> None:
    """Gain 1 shard if unseen, lose the record of n shards if caught: 1 - r (n + 1) <= 0, < 0 for n >= 1."""
    for rate in (0.01, 0.1, 0.5):
        for merged in range(200):
            r = work.check_rate(merged, rate)
            assert 1 - r * (merged + 1) <= (0 if merged == 0 else -1e-9), (rate, merged, r)
    assert work.check_rate(0, 0.1) == 1.0 and work.check_rate(100, 0.1) == 0.1
    assert work.check_rate(0, 0.0) == 0.0  # off
