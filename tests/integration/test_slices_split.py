"""A sliced round's merge shared by two aggregator processes (``coordinator.merging.split``).

Three runs of the same config, the same version 0 (``init --from``) and the
same uploads, each shard's delta drawn from a seed of its own and written
under its lease as a volunteer writes it: ``one`` is merged by one aggregator;
``two`` by two, the one holding a slice frozen (SIGSTOP) until the other has
merged every other slice; in ``three`` that one is killed (SIGKILL) instead.
Each version must equal ``one``'s bit for bit, strategy state included, and
``three`` must publish exactly one version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import torch

from broker import blobs, keys
from coordinator.merging.aggregator import Aggregator
from coordinator.rounds.leases import Request
from coordinator.runs import checkpoints
from coordinator.store import Store
from serialization import loads
from tests.conftest import wait_until
from tests.fixtures.attacker import delta_blob

JOB = "bench.memory_job:make_job"
SLICES = 4
SHARDS = 8  # two voices a slice: shard s trains slice s mod 4; one volunteer sends 0-3, another 4-7
FLAGS = (
    *("--job", JOB, "--job-arg", "params=8000000", "--job-arg", "tensors=8"),
    *("--slices", str(SLICES), "--shards", str(SHARDS), "--strategy", "fedavgm"),
    *("--compression", "none", "--verify", "none", "--deadline", "300"),
)


def test_two_aggregators_merge_a_sliced_round_bit_for_bit_and_a_killed_one_publishes_once(
    processes, redis_server
):
    store = Store(redis_server.client())
    aggregators = {name: processes.aggregator(name) for name in ("agg-a", "agg-b")}
    processes.wait_online(*aggregators)
    processes.json("init", "--run", "one", *FLAGS)
    for run in ("two", "three"):
        processes.json("init", "--run", run, "--from", "one:0", *FLAGS)

    # one: merged by agg-a alone while agg-b is frozen
    os.killpg(aggregators["agg-b"].pid, signal.SIGSTOP)
    _upload_round(processes, store, "one")
    wait_until(lambda: store.version("one") == 1, "run one's version 1", 60, processes)
    os.killpg(aggregators["agg-b"].pid, signal.SIGCONT)

    # two: the aggregator holding a slice is frozen until the other merged every other slice
    _upload_round(processes, store, "two")
    frozen, position = _freeze_a_holder(store, "two", aggregators)
    other = next(name for name in aggregators if name != frozen)
    staged = wait_until(lambda: _all_staged_but(store, "two", position), "the other slices", 60, processes)
    assert any(owner.startswith(other + ":") for owner in staged.values()), (frozen, staged)
    os.killpg(aggregators[frozen].pid, signal.SIGCONT)
    wait_until(lambda: store.version("two") == 1, "run two's version 1", 60, processes)
    _assert_same(store, "two", "one")
    assert all((store.rounds.info(run, 1) or {}).get("accepted") == SHARDS for run in ("one", "two"))

    # three: the aggregator holding a slice is killed; the other publishes the round, once
    _upload_round(processes, store, "three")
    killed, _ = _freeze_a_holder(store, "three", aggregators)
    processes.kill(aggregators.pop(killed))
    wait_until(lambda: store.version("three") == 1, "run three's version 1 after the kill", 90, processes)
    info = store.rounds.info("three", 1) or {}
    assert info["status"] == "done" and store.rounds.count("three") == 1, info
    assert store.model_blob("three", 2) is None and store.version("three") == 1
    _assert_same(store, "three", "one")
    wait_until(lambda: checkpoints.has_version(processes.home, "three", 1), "three on disk", 30, processes)
    assert not checkpoints.has_version(processes.home, "three", 2)


def _upload_round(processes, store: Store, run: str) -> None:
    """Open round 1 and write and announce its uploads as two volunteers would (seeded deltas)."""
    posted = processes.cli("post-round", "--run", run, "--shards", str(SHARDS))
    assert posted.returncode == 0, posted.stderr + processes.log_tail()
    trusted = Aggregator(store, processes.home)
    weights, _ = loads(store.model_blob(run, 0))
    slices = checkpoints.read_config(processes.home, run).slice_tensors
    for shard in range(SHARDS):
        # new volunteers in each run: their weights (probation) do not depend on the runs before
        volunteer, token = f"{run}-v{shard // SLICES}", uuid.uuid4().hex
        request = Request(volunteer, "lease", run, 1, shard, token)
        assert trusted.leases.answer([request]) == ["granted"], processes.log_tail()
        generator = torch.Generator().manual_seed(shard)
        delta = {
            name: torch.randn(weights[name].shape, generator=generator) * 1e-3
            for name in slices[shard % SLICES]
        }
        blob = delta_blob(delta, run, 1, shard, version=0, slice=shard % SLICES, samples=8 + shard)
        upload = keys.upload(volunteer, run, 1, shard, token)
        blobs.write(store.redis, upload, blob)
        store.announce(
            upload
        )  # the aggregators' intake validates it; the batch that fills the round posts it


def _freeze_a_holder(store: Store, run: str, aggregators: dict[str, subprocess.Popen]) -> tuple[str, int]:
    """SIGSTOP an aggregator while it holds an unmerged slice of round 1: (its name, the slice's position)."""
    key = keys.merge_plan(run, 1)

    def holding() -> tuple[str, int] | None:
        plan = store.redis.hgetall(key)
        for field, owner in plan.items():
            name, staged = owner.decode().split(":")[0], b"staged:" + field[6:]
            if not field.startswith(b"owner:") or staged in plan or name not in aggregators:
                continue
            os.killpg(aggregators[name].pid, signal.SIGSTOP)
            after = store.redis.hgetall(key)  # it may have finished the slice before the signal
            if staged not in after and after.get(field) == owner:
                return name, int(field[6:])
            os.killpg(aggregators[name].pid, signal.SIGCONT)
        return None

    return wait_until(holding, f"an aggregator merging a slice of {run}", 60, poll=0.002)


def _all_staged_but(store: Store, run: str, position: int) -> dict[int, str] | None:
    """Who merged each slice but ``position`` once all are staged (position -> owner), else None."""
    plan = store.redis.hgetall(keys.merge_plan(run, 1))
    count = int(plan.get(b"count", 0))
    others = [p for p in range(count) if p != position]
    if not others or any(f"staged:{p}".encode() not in plan for p in others):
        return None
    return {p: plan[f"owner:{p}".encode()].decode() for p in others}


def _assert_same(store: Store, run: str, reference: str) -> None:
    """The run's version 1 and strategy state equal ``reference``'s bit for bit."""
    for blob_of in (lambda r: store.model_blob(r, 1), store.strategy_blob):
        ours, theirs = loads(blob_of(run))[0], loads(blob_of(reference))[0]
        assert list(ours) == list(theirs)
        for name in ours:
            assert ours[name].numpy().tobytes() == theirs[name].numpy().tobytes(), (run, name)
