"""Model fusion end to end: branch a run, train the branches apart, fuse them by weights and by outputs."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from tests.conftest import TINY_CHARLM, Processes

ROUND = ("--local-steps", "20", "--shards", "1", "--deadline", "120")


def _export(processes: Processes, run: str, *extra: str) -> dict[str, torch.Tensor]:
    out = processes.home / f"{run}{'-'.join(extra)}.safetensors"
    result = processes.cli("export", "--run", run, *extra, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return load_file(out)


def _train_one_round(processes: Processes, run: str) -> dict:
    document = processes.json("run", "--run", run, "--rounds", "1")
    assert document["rounds"][0]["status"] == "done", document
    return document


def test_branches_trained_apart_fuse_by_weights_and_by_outputs(processes: Processes):
    # arrange: a seed run trained one round, two branches of it, each trained one round apart
    processes.aggregator()
    processes.volunteer("alice")
    processes.json("init", "--run", "seed", "--job", "charlm", *TINY_CHARLM, *ROUND)
    _train_one_round(processes, "seed")
    first = processes.json("init", "--run", "b1", "--from", "seed", *ROUND)
    second = processes.json("init", "--run", "b2", "--from", "seed:1", *ROUND, "--lr", "0.01")
    assert first["branched_from"] == second["branched_from"] == {"run": "seed", "version": 1}
    parent, branch = _export(processes, "seed"), _export(processes, "b1")
    assert all(torch.equal(parent[name], branch[name]) for name in parent)  # version 0 is seed's version 1
    _train_one_round(processes, "b1")
    _train_one_round(processes, "b2")
    a, b = _export(processes, "b1"), _export(processes, "b2")
    assert any(not torch.equal(a[name], b[name]) for name in a)  # trained apart, they differ

    # act 1: average
    fused = processes.json("fuse", "--runs", "b1,b2", "--out", "soup", "--method", "average")

    # assert 1: version 0 is the elementwise mean (float32 rounding), and the run trains on
    assert fused["members"] == [{"run": "b1", "version": 1}, {"run": "b2", "version": 1}]
    soup = _export(processes, "soup")
    assert soup.keys() == a.keys()
    for name in soup:
        torch.testing.assert_close(soup[name], (a[name] + b[name]) / 2, rtol=2.4e-7, atol=1e-9)
    trained = _train_one_round(processes, "soup")
    assert trained["final"]["model_version"] == 1

    # act 2: ensembles, uniform (following both runs) and by posterior (b1 pinned at version 0)
    processes.json("fuse", "--runs", "b1,b2", "--out", "duo", "--method", "ensemble")
    processes.json(
        "fuse", "--runs", "b1:0,b2", "--out", "btm", "--method", "ensemble", "--weights", "posterior"
    )
    mixed = processes.json("evaluate", "--run", "duo")
    losses = [processes.json("evaluate", "--run", run)["eval_loss"] for run in ("b1", "b2")]
    posterior = processes.json("evaluate", "--run", "btm")
    sampled = processes.json("sample", "--run", "duo", "--prompt", "def ", "--tokens", "20")
    out = processes.home / "duo-export"
    exported = processes.cli("export", "--run", "duo", "--out", str(out))

    # assert 2: a mixture's log-loss is at most the mean of its members'; it samples text;
    # the pinned member reads its version, the other follows; export writes each member and a manifest
    assert mixed["eval_loss"] <= sum(losses) / 2, (mixed, losses)
    assert 0 <= mixed["eval_accuracy"] <= 1 and mixed["forward_passes"] == 2
    assert [m["version"] for m in mixed["members"]] == [1, 1]
    assert [m["version"] for m in posterior["members"]] == [0, 1] and math.isfinite(posterior["eval_loss"])
    assert sampled["text"].startswith("def ") and len(sampled["text"]) > len("def ")
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["run"], m["version"], m["weight"]) for m in manifest["members"]] == [
        ("b1", 1, 0.5),
        ("b2", 1, 0.5),
    ]
    member = load_file(out / manifest["members"][0]["file"])
    assert all(torch.equal(member[name], a[name]) for name in a)
