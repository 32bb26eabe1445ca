"""Slices of a model (``init --slices``): the plan, bad input, routing by one shard's need, the intake."""

from __future__ import annotations

import msgpack
import pytest
import torch

from broker import keys
from broker.routing import queues_for
from broker.run_config import RunConfig
from coordinator.rounds.intake import _check
from coordinator.runs.context import RunContext
from coordinator.runs.slicing import shard_memory_gb
from jobs import JobError, load_job
from jobs.slicing import balanced, by_blocks, plan
from serialization import dumps
from tests.conftest import TINY_CHARLM
from tests.coordinator.test_cli_errors import _assert_one_clear_line, in_process  # noqa: F401
from volunteer.trainer import train_shard

SLICED = "tests.fixtures.jobs_sliced:make_job"


def test_balanced_cuts_contiguous_slices_whose_largest_is_smallest():
    sizes = {"a": 5, "b": 1, "c": 1, "d": 1, "e": 4, "f": 4}
    slices = balanced([[n] for n in sizes], sizes, 3)
    assert slices == [["a", "b"], ["c", "d", "e"], ["f"]]  # largest 6: no 3 contiguous cuts do better
    assert [n for s in balanced([[n] for n in sizes], sizes, 6) for n in s] == list(sizes)
    assert all(balanced([[n] for n in sizes], sizes, 6))  # none empty


def test_the_built_in_jobs_cut_between_layers():
    job = load_job("charlm", {"layers": 2, "width": 32, "heads": 2})
    model = job.build_model()
    slices = plan(job, model, 4)
    names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    assert sorted(n for s in slices for n in s) == sorted(names)
    blocks = [{n.split(".")[1] for n in s if n.startswith("blocks.")} for s in slices]
    assert all(len(b) <= 1 for b in blocks)  # no block is split between slices
    assert len(by_blocks(model, len(names))) == len(names)  # more slices than layers: by tensor


@pytest.mark.parametrize("slicing", ["miss", "repeat", "invent"])
def test_a_jobs_slices_must_hold_each_tensor_once(slicing):
    job = load_job(SLICED, {"slicing": slicing})
    with pytest.raises(JobError):
        plan(job, job.build_model(), 2)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--job", "charlm", "--slices", "0"], ["--slices"]),
        (["--job", SLICED, "--slices", "3", "--shards", "3"], ["--slices 3", "2 trainable tensors"]),
        (["--job", SLICED, "--job-arg", "slicing=miss", "--slices", "2"], ["slices", "empty"]),
        (["--job", SLICED, "--job-arg", "slicing=repeat", "--slices", "2"], ["weight", "twice"]),
        (["--job", SLICED, "--job-arg", "slicing=invent", "--slices", "2"], ["gain"]),
        (["--job", "charlm", "--slices", "4", "--shards", "2"], ["--shards 4"]),
        (["--job", "charlm", "--slices", "2", "--mode", "async", "--buffer", "2"], ["--mode sync"]),
        (["--job", "charlm", "--slices", "2", "--dp-clip", "1", "--dp-noise", "1"], ["--dp-clip"]),
        (["--job", "charlm", "--slices", "2", "--downlink-compression", "topk:0.01"], ["--downlink"]),
    ],
)
def test_init_refuses_bad_slices_before_writing_anything(tmp_path, redis_server, in_process, flags, words):  # noqa: F811
    result = in_process("init", "--run", "r1", *flags)
    _assert_one_clear_line(result, *words)
    assert redis_server.client().keys("ct:*") == []
    assert not (tmp_path / "home" / "runs").exists()


def test_a_sliced_run_records_its_slices_and_one_shards_memory(redis_server, in_process):  # noqa: F811
    assert in_process("init", "--run", "s", "--job", "charlm", *TINY_CHARLM, "--slices", "3").returncode == 0
    config = msgpack.unpackb(redis_server.client().get(keys.run_config("s")))
    assert config["slices"] == 3 and len(config["slice_tensors"]) == 3
    assert config["downlink_compression"] == "none" and config["shard_memory_gb"] > 0
    status = in_process("status", "--run", "s", "--json")
    assert '"slices": 3' in status.stdout and '"shard_memory_gb"' in status.stdout


def test_a_slice_fits_a_volunteer_the_whole_model_does_not():
    # 8 tensors of 1.25e9 float32 parameters (40 GB), on the meta device: nothing allocated
    weights = {f"w{i}": torch.empty(1_250_000_000, device="meta") for i in range(8)}
    whole = shard_memory_gb(weights, [list(weights)])
    sliced = shard_memory_gb(weights, [[f"w{i}", f"w{i + 1}"] for i in range(0, 8, 2)])
    assert sliced < whole / 2
    from coordinator.runs.slicing import tier

    offer = 96  # GB a volunteer offers (volunteer start --memory-gb)
    assert RunConfig(min_memory_gb=tier(sliced)).need.queue in queues_for("cpu", offer)
    assert RunConfig(min_memory_gb=tier(whole)).need.queue not in queues_for("cpu", offer)


def test_the_intake_refuses_an_upload_whose_tensors_are_not_its_slices():
    job = load_job(SLICED, {})
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference = {k: (tuple(v.shape), torch.float32) for k, v in weights.items()}
    context = RunContext(
        name="s",
        config={"slices": 2, "slice_tensors": [["weight"], ["bias"]]},
        job=job,
        reference=reference,
        expected={k: (shape, dtype, "none") for k, (shape, dtype) in reference.items()},
        upload_bound=1 << 20,
        download_bound=1 << 20,
        model_bytes=1 << 20,
        model_norm=1.0,
        max_samples=1000,
        privacy=None,
        queue="train",
        slices=(frozenset({"weight"}), frozenset({"bias"})),
    )
    meta = {"samples": 8, "base_version": 0, "train_loss": 1.0}
    trained = train_shard(
        job,
        weights,
        shard=1,
        shards=2,
        steps=2,
        lr=0.1,
        device=torch.device("cpu"),
        seed=1,
        trainable=frozenset({"bias"}),
        optimizer="sgd",
    )
    assert set(trained.delta) == {"bias"}
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the version untouched
    good = dumps(dict(trained.delta), {**meta, "slice": 1})
    assert _check(good, context, 0, 1)[0] is None
    assert "tensor" in (_check(good, context, 0, 0)[0] or "")  # shard 0 trains slice 0: weight
    assert "slice" in (_check(dumps(dict(trained.delta), {**meta, "slice": 0}), context, 0, 1)[0] or "")
    whole = dumps({k: torch.zeros_like(v) for k, v in weights.items()}, {**meta, "slice": 1})
    assert "tensor" in (_check(whole, context, 0, 1)[0] or "")


def test_the_strategy_merges_slice_by_slice_and_an_untouched_slice_keeps_its_bytes_and_state():
    from coordinator.merging.strategies import make_strategy
    from coordinator.runs.slicing import SlicedStrategy

    weights = {"a": torch.ones(3), "b": torch.ones(2), "c": torch.ones(4)}
    before = {k: v.clone() for k, v in weights.items()}
    state = {"momentum/c": torch.full((4,), 7.0)}  # c's momentum from an earlier round
    sliced = SlicedStrategy(lambda: make_strategy("fedavgm"), state)
    sliced.merge_slice(weights, ["a", "b"], iter([(1.0, {"a": torch.ones(3), "b": torch.ones(2)})]))
    assert torch.equal(weights["c"], before["c"])  # no delta of c's slice: bit-identical
    assert not torch.equal(weights["a"], before["a"])
    merged = sliced.state_dict()
    assert torch.equal(merged["momentum/c"], state["momentum/c"])  # its state kept as it was
    assert set(merged) == {"momentum/a", "momentum/b", "momentum/c"}
