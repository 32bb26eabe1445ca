"""Nothing is lost: a run whose Redis lost everything is rebuilt from its disk record.

Real redis-server, a real aggregator and real volunteers; the tiny job, so a
round takes a fraction of a second.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from coordinator.runs import ledger
from coordinator.store import Store
from serialization import loads
from tests.conftest import wait_until

TINY = "tests.fixtures.jobs_tiny:make_job"
ALLOW = ("--allow-job", TINY)


@pytest.fixture
def cluster(processes, redis_server):
    processes.store = Store(redis_server.client())
    return processes


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _wait_for_disk(cluster, number: int) -> None:
    """The aggregator writes a round's record a moment after Redis publishes its version."""
    ended = lambda: ledger.rounds_of(cluster.home, "r").get(number, {}).get("status") == "done"  # noqa: E731
    wait_until(ended, f"round {number}'s record on disk", 30)


def _state(store: Store) -> dict:
    """What a run continues from, as tensors and numbers: strategy, downlink residual, credit, history."""
    strategy, residual = store.strategy_blob("r"), store.downlink_residual("r")
    return {
        "blobs": [bytes(blob or b"") for blob in (store.model_blob("r", 3), strategy, residual)],
        "strategy": loads(strategy)[0] if strategy else None,
        "residual": loads(residual)[0] if residual else None,
        "volunteers": store.volunteers(),
        "voice_norms": store.voice_norms("r"),
        "version": store.version("r"),
    }


def _same_tensors(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_whose_redis_was_flushed_is_restored_from_disk_and_goes_on(cluster, redis_server):
    home = cluster.home
    aggregator = cluster.aggregator()
    volunteer = cluster.volunteer("v1", *ALLOW)
    # momentum (strategy state) and a lossy downlink (a residual): both must come back bit for bit
    flags = ("--strategy", "fedavgm", "--compression", "int8", "--local-steps", "2", "--shards", "2")
    cluster.json("init", "--run", "r", "--job", TINY, *flags)
    assert cluster.json("run", "--run", "r", "--rounds", "3")["final"]["model_version"] == 3
    _wait_for_disk(cluster, 3)
    cluster.kill(volunteer)  # round 4 is posted with nobody to train it: Redis loses it open
    assert cluster.json("post-round", "--run", "r")["round"] == 4
    before = _state(cluster.store)
    assert before["strategy"] and before["residual"] and before["volunteers"]["v1"]["accepted"] == 6
    assert cluster.cli("export", "--run", "r", "--out", str(home / "v3.safetensors")).returncode == 0

    redis_server.client().flushall()

    status = cluster.json("status")
    assert status["runs"] == [] and status["lost_runs"] == ["r"]
    # export and report read the disk while Redis does not know the run
    assert cluster.cli("export", "--run", "r", "--out", str(home / "lost.safetensors")).returncode == 0
    assert _same_tensors(load_file(home / "lost.safetensors"), load_file(home / "v3.safetensors"))
    assert cluster.cli("report", "--run", "r", "--out", str(home / "lost.png")).returncode == 0
    # init never overwrites the record: one line naming restore and --force, nothing written
    files = sorted(p.name for p in (home / "runs" / "r").iterdir())
    line = _one_error_line(cluster.cli("init", "--run", "r", "--job", TINY))
    assert "coordinator restore" in line and "--force" in line
    assert sorted(p.name for p in (home / "runs" / "r").iterdir()) == files
    assert cluster.store.runs() == []
    log = cluster.logs / "aggregator.log"
    wait_until(lambda: "is on disk" in log.read_text(), "the aggregator to report the lost run", 60)

    restored = cluster.json("restore", "--run", "r")["restored"]
    assert restored[0]["model_version"] == 3 and restored[0]["reposted_round"] == 4
    assert "in Redis already" in _one_error_line(cluster.cli("restore", "--run", "r"))
    assert "neither in Redis nor on disk" in _one_error_line(cluster.cli("restore", "--run", "nope"))

    after = _state(cluster.store)
    assert after["version"] == 3 and after["voice_norms"] == before["voice_norms"]
    assert after["blobs"] == before["blobs"]  # the wire bytes of version 3, its strategy state, residual
    assert _same_tensors(after["strategy"], before["strategy"])
    assert _same_tensors(after["residual"], before["residual"])
    seconds = [state["volunteers"]["v1"].pop("train_seconds") for state in (before, after)]
    assert math.isclose(*seconds, rel_tol=1e-9) and after["volunteers"] == before["volunteers"]
    assert cluster.cli("export", "--run", "r", "--out", str(home / "restored.safetensors")).returncode == 0
    # (the files' bytes differ only in the order safetensors writes their metadata in)
    assert _same_tensors(load_file(home / "restored.safetensors"), load_file(home / "v3.safetensors"))

    cluster.volunteer("v2", *ALLOW)  # the reposted round 4 is trained and makes version 4
    document = cluster.json("run", "--run", "r", "--rounds", "1")
    assert [(r["round"], r["status"], r["model_version"]) for r in document["rounds"]] == [(4, "done", 4)]
    assert aggregator.poll() is None
    _wait_for_disk(cluster, 4)

    # --force moves the old record aside (nothing deleted) and starts afresh
    redis_server.client().flushall()
    assert cluster.cli("init", "--run", "r", "--job", TINY, "--force").returncode == 0
    (moved,) = (home / "runs").glob("r.moved-*")
    assert (moved / "model-v000004.safetensors").exists() and json.loads((moved / "config.json").read_text())
    assert cluster.store.version("r") == 0 and cluster.json("status")["lost_runs"] == []


def test_an_aggregator_started_with_restore_brings_back_a_run_redis_lost_while_it_ran(cluster, redis_server):
    cluster.aggregator("aggregator", "--restore")
    volunteer = cluster.volunteer("v1", *ALLOW)
    cluster.json("init", "--run", "r", "--job", TINY, "--local-steps", "2", "--shards", "2")
    assert cluster.json("run", "--run", "r", "--rounds", "1")["final"]["model_version"] == 1
    cluster.kill(volunteer)
    assert cluster.json("post-round", "--run", "r")["round"] == 2

    redis_server.client().flushall()

    # the round Redis lost open is posted again by the aggregator, under its number
    wait_until(lambda: cluster.store.rounds.status("r", 2) == "open", "the aggregator to restore the run", 60)
    assert cluster.store.runs() == ["r"] and cluster.store.version("r") == 1
    cluster.volunteer("v2", *ALLOW)
    document = cluster.json("run", "--run", "r", "--rounds", "1")
    assert [(r["round"], r["status"], r["model_version"]) for r in document["rounds"]] == [(2, "done", 2)]
