"""Why robust strategies exist: one volunteer in four attacks, the merge decides the damage.

The simulation uses the real job, trainer and strategies in one process (no
broker), with no norm screening and no clipping, so only the strategy
stands between the attacker and the model.
"""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.merging.strategies import make_strategy
from jobs import load_job
from volunteer.trainer import seed_for, train_shard

JOB_ARGS = {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 40, "eval_batches": 4}
ROUNDS, SHARDS, STEPS = 3, 4, 5


def _final_eval_loss(spec: str, attack: str | None) -> float:
    torch.manual_seed(0)
    job = load_job("charlm", JOB_ARGS)
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = make_strategy(spec)
    for number in range(ROUNDS):
        deltas = []
        for shard in range(SHARDS):
            result = train_shard(
                job,
                weights,
                shard=shard,
                shards=SHARDS,
                steps=STEPS,
                lr=3e-3,
                device=torch.device("cpu"),
                seed=seed_for("robust", number, shard),
            )
            delta = result.delta
            if attack and shard == SHARDS - 1:
                factor = 1000.0 if attack == "scale" else -1.0
                delta = {k: v * factor for k, v in delta.items()}
            deltas.append((float(result.samples), delta))
        weights = strategy.aggregate(weights, iter(deltas))
    model.load_state_dict(weights)
    return job.evaluate(model)["eval_loss"]


@pytest.fixture(scope="module")
def clean_losses() -> dict[str, float]:
    specs = ("fedavg", "median", "trimmed-mean:0.25", "krum:1")
    return {spec: _final_eval_loss(spec, None) for spec in specs}


@pytest.mark.parametrize("spec", ["median", "trimmed-mean:0.25", "krum:1"])
@pytest.mark.parametrize("attack", ["scale", "flip"])
def test_robust_strategies_stay_within_1_5x_of_a_clean_run_under_attack(clean_losses, spec, attack):
    attacked = _final_eval_loss(spec, attack)
    print(f"\n{spec} under {attack}: {attacked:.4f} (clean {clean_losses[spec]:.4f})")
    assert attacked <= 1.5 * clean_losses[spec]


def test_plain_fedavg_is_ruined_by_one_scaled_delta(clean_losses):
    attacked = _final_eval_loss("fedavg", "scale")
    print(f"\nfedavg under scale: {attacked} (clean {clean_losses['fedavg']:.4f})")
    assert not math.isfinite(attacked) or attacked > 1.5 * clean_losses["fedavg"]
