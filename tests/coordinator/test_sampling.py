"""Sampled probe judging (``init --probe-voices``): who is judged, when the draw is made, the penalty."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from broker import blobs, keys
from coordinator.merging import sampling, verification
from coordinator.merging.aggregator import Aggregator
from coordinator.merging.sampling import CAUGHT, TRUSTED, Selection, reputations_after, sample_size, select
from coordinator.merging.verification import REPUTATION_STEP, SKETCH, copies, next_reputation
from coordinator.store import Store
from serialization import dumps
from tests.fixtures.jobs_tiny import TinyJob

TINY = "tests.fixtures.jobs_tiny:make_job"


def test_a_round_of_at_most_the_limit_judges_every_voice_as_before():
    reputations: dict[str, float | None] = {f"v{i}": 0.9 for i in range(8)}
    assert select(reputations, 8) == Selection(frozenset(reputations))
    kept = {f"v{i}" for i in range(7)}  # v7 rejected
    expected = {name: next_reputation(value, name in kept) for name, value in reputations.items()}
    assert reputations_after(reputations, select(reputations, 8), kept) == expected


def test_above_the_limit_new_and_low_reputation_voices_are_always_judged_plus_a_sample_of_the_rest():
    reputations: dict[str, float | None] = {f"t{i:03d}": 0.95 for i in range(200)}
    reputations |= {"new-a": None, "new-b": None, "low": TRUSTED - 0.01, "caught-once": CAUGHT}
    draws = [select(reputations, 16) for _ in range(3)]
    for chosen in draws:
        assert {"new-a", "new-b", "low", "caught-once"} <= chosen.judged
        assert len(chosen.sampled) == sample_size(204, 4, 16) == 12
        assert chosen.judged == chosen.sampled | {"new-a", "new-b", "low", "caught-once"}
        assert chosen.skipped == set(reputations) - chosen.judged
    # drawn with secrets, not from anything known before the round (seed, round number): the
    # three draws of one round differ (all equal by chance: about 1 in 1e38)
    assert isinstance(sampling._RANDOM, secrets.SystemRandom)
    assert len({chosen.sampled for chosen in draws}) == 3
    # many new voices: at least half the limit of trusted ones is still drawn, as the reference
    crowd = {**reputations, **{f"n{i}": None for i in range(30)}}
    assert len(select(crowd, 16).sampled) == 8


def test_a_caught_sampled_voice_loses_more_than_many_sampled_rounds_earn():
    reputations: dict[str, float | None] = {"honest": 0.9, "cheat": 0.9, "idle": 0.9, "new": None}
    selection = Selection(
        frozenset({"honest", "cheat", "new"}), frozenset({"honest", "cheat"}), frozenset({"idle"})
    )
    after = reputations_after(reputations, selection, {"honest", "idle", "new"})
    assert after == {
        "honest": pytest.approx(0.92),
        "cheat": CAUGHT,
        "new": pytest.approx(0.6),
    }  # idle: unjudged
    # the documented bound (docs/SECURITY.md): a catch costs at least TRUSTED, a sampled round
    # earns at most REPUTATION_STEP x (1 - TRUSTED): more than 11 of them
    assert (TRUSTED - CAUGHT) / (REPUTATION_STEP * (1 - TRUSTED)) > 11
    # and a caught voice is judged every round until it earns trust back (six merged rounds)
    value, rounds = CAUGHT, 0
    while not sampling.trusted(value):
        value, rounds = next_reputation(value, True), rounds + 1
    assert rounds == 6


class _Draw:
    """The random source, recording each draw and what Redis held then; puts ``first`` in the sample."""

    def __init__(self, store: Store, run: str, first: str) -> None:
        self.store, self.run, self.first = store, run, first
        self.seen: list[tuple[list[str], int, int]] = []

    def sample(self, population: Sequence[str], k: int) -> list[str]:
        self.seen.append((list(population), k, len(self.store.rounds.accepted_uploads(self.run, 1))))
        rest = [name for name in population if name != self.first]
        return [self.first, *secrets.SystemRandom().sample(rest, k - 1)]


def _round(processes: Any, store: Store, run: str, limit: str | None) -> tuple[dict, dict[str, Any]]:
    """A round of 12 voices of the tiny job (2 new, 1 of low reputation, 9 trusted, one a cheater)."""
    flags = ["--probe-voices", limit] if limit else []
    processes.json("init", "--run", run, "--job", TINY, "--shards", "12", "--max-share", "1", *flags)
    store.rounds.open(run, 12, 12, 600.0)
    job = TinyJob()
    base = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    toward = {"weight": 0.2 * (job.true_w.T - base["weight"]), "bias": -0.2 * base["bias"]}
    names = [f"{run}-new0", f"{run}-new1", f"{run}-low"] + [f"{run}-t{i}" for i in range(9)]
    cheat = f"{run}-t0"
    store.set_reputations({f"{run}-low": 0.5, **{name: 0.9 for name in names[3:]}})
    gen = torch.Generator().manual_seed(7)
    for shard, name in enumerate(names):
        delta = {k: v * (1 + 0.3 * torch.randn(v.shape, generator=gen)) for k, v in toward.items()}
        if name == cheat:
            delta = {k: -3 * v for k, v in toward.items()}
        copy = keys.accepted_upload(run, 1, name, shard, f"{shard:032x}")
        blobs.write(store.redis, copy, dumps(delta, {"samples": 8, "train_loss": 1.0, "base_version": 0}))
        assert store.rounds.accept(run, 1, shard, copy, f"{shard:064x}", name)[0] == "accepted"
    summary = Aggregator(store, processes.home).aggregate(run, 1)
    assert summary is not None and summary["status"] == "done", summary
    found = [json.loads(e) for e in store.redis.hvals(keys.round_rejections(run, 1))]
    reasons = {entry["volunteer"]: entry["reason"] for entry in found}
    return reasons, {"names": names, "cheat": cheat, "after": store.reputations(names), "summary": summary}


def test_the_aggregator_judges_a_sample_drawn_after_the_uploads_and_penalises_a_caught_cheater(
    processes, redis_server, monkeypatch
):
    store = Store(redis_server.client())
    draw = _Draw(store, "big", "big-t0")
    monkeypatch.setattr(sampling, "_RANDOM", draw)
    reasons, seen = _round(processes, store, "big", "8")
    names, cheat, after = seen["names"], seen["cheat"], seen["after"]
    # one draw, among the 9 trusted voices, made when all 12 uploads were in
    assert draw.seen == [(sorted(names[3:]), sample_size(12, 3, 8), 12)]
    assert list(reasons) == [cheat] and reasons[cheat].startswith("probe:")
    assert after[cheat] == CAUGHT and seen["summary"]["accepted"] == 11
    for name in names[:3]:  # new and low-reputation voices: judged (merged) whatever the draw
        assert after[name] == pytest.approx(0.6)
    sampled = {name for name in names[3:] if after[name] != 0.9} - {cheat}
    assert len(sampled) == sample_size(12, 3, 8) - 1 and all(after[n] == pytest.approx(0.92) for n in sampled)
    # the unjudged trusted voices were merged at their reputation and earned nothing
    assert {name for name in names[3:] if after[name] == 0.9} == set(names[3:]) - sampled - {cheat}
    # below the limit (the default, 32) every voice is judged and the cheater moves by the usual step
    reasons, seen = _round(processes, store, "small", None)
    names, cheat, after = seen["names"], seen["cheat"], seen["after"]
    assert list(reasons) == [cheat] and reasons[cheat].startswith("probe:")
    assert len(draw.seen) == 1  # no draw
    assert after[cheat] == pytest.approx(next_reputation(0.9, False))
    assert all(after[name] == pytest.approx(0.92) for name in names[4:])


def test_a_round_of_many_voices_finds_the_same_copies_as_comparing_every_pair():
    """From PREFILTER_FROM voices only pairs near on random buckets are compared whole."""
    gen = torch.Generator().manual_seed(3)
    sketches = {f"v{i:03d}": torch.randn(SKETCH, generator=gen, dtype=torch.float64) for i in range(80)}
    sketches["copy"] = sketches["v007"] * 2 + 0.03 * torch.randn(SKETCH, generator=gen, dtype=torch.float64)
    sketches["empty"] = torch.zeros(SKETCH, dtype=torch.float64)
    reputations: dict[str, float | None] = {"v007": 0.9}
    found = copies(sketches, None, reputations)
    assert set(found) == {"copy"} and "v007" in found["copy"]
    names = list(sketches)
    every = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    assert set(verification._pairs(sketches, names)) <= set(every)
    assert ("v007", "copy") in verification._pairs(sketches, names)
