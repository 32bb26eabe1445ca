"""A sliced run (``init --slices 4``) end to end: real redis-server, aggregator and volunteers."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from coordinator.runs import checkpoints
from jobs import load_job
from jobs.loader import parse_job_args
from tests.conftest import TINY_CHARLM, wait_until


def test_a_sliced_run_trains_each_slice_from_its_own_uploads_and_keeps_an_untouched_slice(processes):
    processes.aggregator()
    processes.volunteer("alice")
    processes.volunteer("bob")
    init = processes.json(
        "init",
        "--run",
        "sl",
        "--job",
        "charlm",
        *TINY_CHARLM,
        "--slices",
        "4",
        "--shards",
        "4",
        "--compression",
        "none",
        "--local-steps",
        "15",
        "--deadline",
        "120",
    )
    status = processes.json("status", "--run", "sl")
    assert status["runs"][0]["slices"] == 4 and status["runs"][0]["shard_memory_gb"] > 0
    config = checkpoints.read_config(processes.home, "sl")
    slices = config.slice_tensors or []
    model = load_job("charlm", parse_job_args(TINY_CHARLM[1::2])).build_model()
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert sorted(n for s in slices for n in s) == sorted(names)  # each tensor in exactly one slice
    model_bytes = 4 * sum(v.numel() for v in model.state_dict().values())

    document = processes.json("run", "--run", "sl", "--rounds", "1")
    rounds = document["rounds"]
    assert [r["model_version"] for r in rounds] == [1], processes.log_tail()
    # every upload passed the intake, which refuses one whose tensors are not exactly its slice's
    assert all(r["accepted"] == 4 and r["rejected"] == 0 for r in rounds), rounds
    # four uploads of one slice each: one model's bytes a round (whole-model uploads would be four)
    assert all(r["uplink_bytes"] < 1.2 * model_bytes for r in rounds), (rounds, model_bytes)

    # a round of 3 shards trains slices 0-2: slice 3 keeps its bytes, the others move
    posted = processes.cli("post-round", "--run", "sl", "--shards", "3", "--wait", "--json")
    assert posted.returncode == 0, posted.stderr + processes.log_tail()
    third = json.loads(posted.stdout)["rounds"][0]
    assert third["model_version"] == 2
    losses = [init["initial"]["eval_loss"], rounds[0]["eval_loss"], third["eval_loss"]]
    assert losses[2] < losses[1] < losses[0], losses

    # the aggregator writes a version to disk just after publishing it
    def on_disk() -> bool:
        return all(checkpoints.has_version(processes.home, "sl", v) for v in (1, 2))

    wait_until(on_disk, "versions 1 and 2 on disk", processes=processes)
    before, after = (checkpoints.load_version(processes.home, "sl", v) for v in (1, 2))
    assert all(torch.equal(before[n], after[n]) for n in slices[3])
    for touched in slices[:3]:
        assert any(not torch.equal(before[n], after[n]) for n in touched)

    # each shard trained slice shard mod 4, as its volunteer reports it
    trained = [r for name in ("alice", "bob") for r in processes.results(name) if "loss" in r]
    assert {(r["round"], r["shard"]) for r in trained} == {
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 0),
        (2, 1),
        (2, 2),
    }
    assert all(r["slice"] == r["shard"] % 4 for r in trained), trained

    out = processes.home / "sl.safetensors"
    assert processes.cli("export", "--run", "sl", "--out", str(out)).returncode == 0
    exported = load_file(out)
    assert sorted(exported) == sorted(model.state_dict())
    assert all(bool(torch.isfinite(t).all()) for t in exported.values())
    assert math.isfinite(document["final"]["eval_loss"])
