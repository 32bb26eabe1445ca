"""The trusted side reads each accepted delta from Redis once, and what it published not at all."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import torch

from broker import blobs, keys
from coordinator.merging.aggregator import Aggregator
from coordinator.merging.reading import RoundReader, SketchCache
from coordinator.merging.verification import SKETCH_CACHE, sketch
from coordinator.rounds.intake import Intake
from coordinator.rounds.state import Fact
from coordinator.rounds.validation import delta_norm
from coordinator.runs.context import RunContexts
from coordinator.store import Store
from serialization import dumps, loads
from tests.fixtures.jobs_tiny import TinyJob

TINY = "tests.fixtures.jobs_tiny:make_job"
VOICES = 6


def _accept_round(store: Store, run: str, number: int, base: int, record: bool) -> list[str]:
    """``VOICES`` honest deltas accepted as the intake accepts them (``record``: with its facts)."""
    store.rounds.open(run, VOICES, VOICES, 600.0)
    job = TinyJob()
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    toward = {"weight": 0.2 * (job.true_w.T - weights["weight"]), "bias": -0.2 * weights["bias"]}
    gen = torch.Generator().manual_seed(number)
    copies = []
    for shard in range(VOICES):
        name = f"v{shard}"
        delta = {k: v * (1 + 0.3 * torch.randn(v.shape, generator=gen)) for k, v in toward.items()}
        meta = {"samples": 8, "train_loss": 1.0, "base_version": base}
        copy = keys.accepted_upload(run, number, name, shard, f"{number:016x}{shard:016x}")
        blobs.write(store.redis, copy, dumps(delta, meta))
        facts = [Fact(run, number, copy, delta_norm(delta), meta)] if record else []
        accept = (run, number, shard, copy, f"{number:032x}{shard:032x}", name)
        assert store.rounds.accept_many([accept], facts=facts)[0][0] == "accepted"
        copies.append(copy)
    return copies


def test_a_merge_reads_each_copy_once_and_its_own_last_version_not_at_all(
    processes, redis_server, monkeypatch
):
    store = Store(redis_server.client())
    processes.json("init", "--run", "r", "--job", TINY, "--shards", str(VOICES), "--strategy", "fedavgm")
    reads: Counter[str] = Counter()
    models: list[int] = []
    strategy_reads: list[str] = []
    get_uploads, model_blob, strategy_blob = Store.get_uploads, Store.model_blob, Store.strategy_blob

    def counted_uploads(self: Store, upload_keys: Any, limit: Any = None) -> Any:
        reads.update(upload_keys)
        return get_uploads(self, upload_keys, limit)

    def counted_model(self: Store, run: str, version: int) -> Any:
        models.append(version)
        return model_blob(self, run, version)

    def counted_strategy(self: Store, run: str) -> Any:
        strategy_reads.append(run)
        return strategy_blob(self, run)

    monkeypatch.setattr(Store, "get_uploads", counted_uploads)
    monkeypatch.setattr(Store, "model_blob", counted_model)
    monkeypatch.setattr(Store, "strategy_blob", counted_strategy)
    aggregator = Aggregator(store, processes.home)

    first = _accept_round(store, "r", 1, 0, record=True)
    summary = aggregator.aggregate("r", 1)
    assert summary is not None and summary["status"] == "done" and summary["accepted"] == VOICES, summary
    # screened by the norms the intake recorded; judged (probe), sketched and merged from one read
    assert {key: reads[key] for key in first} == dict.fromkeys(first, 1)
    assert 0 in models and strategy_reads == ["r"]  # version 0 and the (empty) state: not published here

    reads.clear(), models.clear(), strategy_reads.clear()
    second = _accept_round(store, "r", 2, 1, record=True)
    summary = aggregator.aggregate("r", 2)
    assert summary is not None and summary["status"] == "done", summary
    assert {key: reads[key] for key in second} == dict.fromkeys(second, 1)
    # version 1 and fedavgm's momentum after it were this process's own: not read back
    assert 1 not in models and strategy_reads == []
    assert store.version("r") == 2

    # another process (no kept version) reads version 2 and the state from Redis, and copies
    # accepted without facts (by an earlier version of the intake) are still screened, read once
    other = Aggregator(store, processes.home)
    reads.clear(), models.clear(), strategy_reads.clear()
    third = _accept_round(store, "r", 3, 2, record=False)
    summary = other.aggregate("r", 3)
    assert summary is not None and summary["status"] == "done", summary
    assert 2 in models and strategy_reads == ["r"]
    assert {key: reads[key] for key in third} == dict.fromkeys(third, 1)


def test_past_its_budget_the_merge_reads_a_copy_again_rather_than_hold_it(
    processes, redis_server, monkeypatch
):
    store = Store(redis_server.client())
    processes.json("init", "--run", "b", "--job", TINY, "--shards", str(VOICES))
    reads: Counter[str] = Counter()
    get_uploads = Store.get_uploads

    def counted_uploads(self: Store, upload_keys: Any, limit: Any = None) -> Any:
        reads.update(upload_keys)
        return get_uploads(self, upload_keys, limit)

    monkeypatch.setattr(Store, "get_uploads", counted_uploads)
    copies = _accept_round(store, "b", 1, 0, record=True)
    summary = Aggregator(store, processes.home, cache_bytes=0).aggregate("b", 1)
    assert summary is not None and summary["status"] == "done" and summary["accepted"] == VOICES, summary
    assert all(reads[key] >= 2 for key in copies)  # judged and merged: each read for each pass


def test_a_voice_the_intake_sketched_is_decoded_only_for_the_merge_when_no_verdict_needs_its_gain(
    processes, redis_server, monkeypatch
):
    """Judging takes a one-shard voice's norm and sketch as the intake took them (``SketchCache``):
    in a round whose voices all follow each other no probe pass runs, so each copy is decoded
    once, by the merge; without them, once more for judging."""
    store = Store(redis_server.client())
    processes.json("init", "--run", "s", "--job", TINY, "--shards", str(VOICES), "--verify", "probe")
    decoded: Counter[int] = Counter()
    decode = RoundReader.decode

    def counted(self: RoundReader, context: Any, blob: Any, metas: Any, shard: int) -> Any:
        decoded[shard] += 1
        return decode(self, context, blob, metas, shard)

    monkeypatch.setattr(RoundReader, "decode", counted)
    aggregator = Aggregator(store, processes.home)
    copies = _accept_round(store, "s", 1, 0, record=True)
    for copy in copies:  # as the intake keeps them when it decodes each upload
        delta, _ = loads(blobs.read(store.redis, copy))
        aggregator.intake.sketches.put("s", 1, copy, delta_norm(delta), sketch(delta))
    summary = aggregator.aggregate("s", 1)
    assert summary is not None and summary["status"] == "done" and summary["accepted"] == VOICES, summary
    assert decoded == Counter(dict.fromkeys(range(VOICES), 1))
    assert all(aggregator.intake.sketches.get(copy) is None for copy in copies)  # the round's are let go

    decoded.clear()
    _accept_round(store, "s", 2, 1, record=True)  # none kept: judging decodes each voice for its sketch
    assert aggregator.aggregate("s", 2)["status"] == "done"
    assert decoded == Counter(dict.fromkeys(range(VOICES), 2))


def test_the_sketch_cache_keeps_the_newest_within_its_budget_and_lets_a_merged_round_go():
    one = torch.zeros(1000, dtype=torch.float64)  # 8,000 bytes
    cache = SketchCache(20_000)
    for number, key in enumerate(("a", "b", "c"), start=1):
        cache.put("r", number, key, 1.0, one.clone())
    assert cache.get("a") is None and cache.get("b") is not None and cache.get("c") is not None
    cache.put("other", 1, "d", 2.0, one)
    cache.forget_through("r", 2)  # round 2 of r merged: its copies and older rounds' go
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") == (2.0, one)
    cache.forget_through("r", 3)
    cache.put("r", 4, "e", 3.0, one)  # room again: what was forgotten no longer counts
    assert cache.get("d") is not None and cache.get("e") is not None
    cache.put("r", 4, "f", 3.0, one)  # past the budget: the oldest, d, goes
    assert cache.get("d") is None and cache.get("e") is not None and cache.get("f") is not None
    assert SketchCache(0).get("d") is None


def test_the_intake_keeps_a_sketch_only_where_it_is_cheap_and_the_run_is_not_sliced(redis_server):
    """Its loop also answers lease requests: a large model's sketch (seconds of hashing) is left to the
    merge, as before, and a sliced run's voices are judged slice by slice."""
    store = Store(redis_server.client())
    intake = Intake(store, RunContexts(store), sketches=SketchCache(1 << 30))
    small = {"w": torch.ones(1000)}
    large = {"w": torch.ones(SKETCH_CACHE + 1)}
    whole, sliced = SimpleNamespace(slices=None), SimpleNamespace(slices=[["w"], ["v"]])
    intake.keep_sketch(whole, "r", 1, "small", 1.0, small)  # type: ignore[arg-type]
    intake.keep_sketch(whole, "r", 1, "large", 1.0, large)  # type: ignore[arg-type]
    intake.keep_sketch(sliced, "r", 1, "slice", 1.0, small)  # type: ignore[arg-type]
    assert intake.sketches.get("small") is not None
    assert intake.sketches.get("large") is None and intake.sketches.get("slice") is None
