"""coordinator.merging.work: the trusted replay is the volunteer's training; the rates make cheating lose."""

from __future__ import annotations

import pytest
import torch

from broker.run_config import RunConfig
from coordinator.merging import work
from tests.fixtures.jobs_tiny import make_job
from volunteer import trainer
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


def test_an_upload_far_shorter_than_the_rounds_others_claiming_as_many_steps_is_always_replayed() -> None:
    """Honest uploads measured 0.905-1.145 of the others' median on the job matrix, half the steps at
    most 0.66: the short one is marked, and ``draw`` takes a marked shard even at rate 0."""
    ten = {"steps": 10}
    metas = {0: ten, 1: ten, 2: ten, 3: ten, 4: {"steps": 5}, 5: {"steps": 5}}
    norms = {0: 1.0, 1: 0.91, 2: 1.14, 3: 0.6, 4: 0.55, 5: 0.62}
    # shard 3 claims ten steps at 0.6 of its peers; 4 and 5 claim five and are compared with each other
    assert work.short(norms, metas) == {3}
    assert work.short({0: 1.0}, {0: ten}) == set()  # nothing to compare with
    assert work.short({0: 0.0, 1: 0.0, 2: 0.0}, dict.fromkeys(range(3), ten)) == set()  # a still model
    owners = {0: "a", 1: "b", 2: "c", 3: "d"}
    veterans = dict.fromkeys(owners.values(), 10**12)
    assert work.draw(owners, veterans, 1e-9, marked={3}) == [3]


def test_a_veteran_turning_lazy_is_marked_on_the_tensors_its_residual_does_not_reach() -> None:
    """Its top-k tensors carry its honest past's error-feedback residual, so its whole upload looks
    ordinary (0.93 here); the tensors the codec sends whole do not, and are short (0.6)."""
    ten = {"steps": 10}
    metas = dict.fromkeys(range(4), ten)
    whole = {0: 1.0, 1: 0.97, 2: 1.05, 3: 0.93}
    dense = {0: 0.5, 1: 0.49, 2: 0.52, 3: 0.3}
    assert work.short(whole, metas) == set()
    assert work.short(whole, metas, dense) == {3}


def test_the_dense_norm_leaves_out_what_the_codec_sends_as_top_k_and_needs_enough_values() -> None:
    """Under ``init``'s codec a tensor of 4,096 values or more goes as top-k (with residuals)."""
    codec = "topk:0.01+int2@4096"
    upload = {"big": torch.full((4096,), 100.0), "gain": torch.full((16,), 3.0), "steps": torch.tensor([7])}
    assert work.dense_norm(upload, codec) == pytest.approx(12.0)  # sqrt(16 * 9): the big one left out
    assert work.dense_norm({"big": upload["big"], "bias": torch.ones(1)}, codec) is None  # click's one bias
    assert work.dense_norm(upload, "none") == pytest.approx((4096 * 100.0**2 + 16 * 9.0) ** 0.5)


def _bf16_autocast(device: torch.device):  # the CUDA path's autocast, on this machine's CPU
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def test_a_replay_under_bf16_autocast_is_the_training_under_it(monkeypatch) -> None:
    """``replay(bf16=True)``, with which bench/work_matrix.py --bf16 measures how far bf16 shards drift,
    is the volunteer's training under bf16 autocast (on one machine), which float32 is not."""
    job = make_job()
    base = job.build_model().state_dict()
    seed = seed_for("r", 2, 1)
    monkeypatch.setattr(trainer, "_autocast", _bf16_autocast)
    trained = train_shard(
        job, base, shard=1, shards=3, steps=10, lr=0.01, device=torch.device("cpu"), seed=seed
    )
    monkeypatch.undo()
    replayed, _ = work.replay(
        job, base, shard=1, shards=3, steps=10, lr=0.01, optimizer="adamw", seed=seed, bf16=True
    )
    assert all(torch.allclose(trained.delta[k], replayed[k], atol=1e-7) for k in replayed)
    full, _ = work.replay(job, base, shard=1, shards=3, steps=10, lr=0.01, optimizer="adamw", seed=seed)
    assert any(not torch.allclose(trained.delta[k], full[k], atol=1e-7) for k in full)  # bf16 is not float32


def test_a_work_checked_runs_volunteers_train_in_float32_so_the_replay_matches_them(monkeypatch) -> None:
    """bf16 autocast (the CUDA path's, here on the CPU) is not replayable; a work-checked run turns it off."""
    assert RunConfig().autocast and not RunConfig(work_check=0.1).autocast
    job = make_job()
    base = job.build_model().state_dict()
    seed = seed_for("r", 4, 0)
    monkeypatch.setattr(trainer, "_autocast", _bf16_autocast)  # as on a CUDA device
    cpu = torch.device("cpu")
    plain = train_shard(
        job, base, shard=0, shards=2, steps=10, lr=0.01, device=cpu, seed=seed, autocast=False
    )
    mixed = train_shard(job, base, shard=0, shards=2, steps=10, lr=0.01, device=cpu, seed=seed)
    replayed, _ = work.replay(job, base, shard=0, shards=2, steps=10, lr=0.01, optimizer="adamw", seed=seed)
    assert all(torch.allclose(plain.delta[k], replayed[k], atol=1e-7) for k in replayed)
    assert any(not torch.allclose(mixed.delta[k], replayed[k], atol=1e-7) for k in replayed)
