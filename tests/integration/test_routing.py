"""Capability routing with real processes: a run's shards reach only volunteers that meet its needs.

Volunteers run on least-privilege ACL users (``volunteer-credentials``), as
strangers would. No GPU is needed: a CPU volunteer must leave a ``--require
gpu`` run's shard alone, and ``--memory-gb`` caps what a volunteer offers.
"""

from __future__ import annotations

import pytest

from coordinator.store import Store
from tests.conftest import wait_until

TINY = "tests.fixtures.jobs_tiny:make_job"


@pytest.fixture
def procs(admin_processes):
    procs, admin = admin_processes
    procs.store = Store(admin)  # to wait on Redis directly, without a CLI process per poll
    return procs


def _volunteer(procs, name: str, *extra: str):
    url = procs.json("volunteer-credentials", name)["url"]
    return procs.volunteer(name, "--allow-job", TINY, *extra, CROWDTRAIN_BROKER_URL=url)


def _init(procs, run: str, *needs: str) -> None:
    procs.json("init", "--run", run, "--job", TINY, "--local-steps", "2", "--shards", "1", *needs)


def _status(procs) -> dict:
    return procs.json("status")


def _run(document: dict, name: str) -> dict:
    return next(r for r in document["runs"] if r["run"] == name)


def test_shards_go_only_to_volunteers_that_meet_the_runs_needs(procs):
    procs.aggregator()
    _volunteer(procs, "laptop", "--memory-gb", "2")
    _init(procs, "needs-gpu", "--require", "gpu")
    _init(procs, "needs-8g", "--min-memory-gb", "6.5")
    _init(procs, "plain")
    procs.cli("post-round", "--run", "needs-gpu")
    procs.cli("post-round", "--run", "needs-8g")
    # posted after the routed shards, trained by the laptop: it is online and taking work
    plain = procs.json("post-round", "--run", "plain", "--wait", "--deadline", "120")
    assert plain["rounds"][0]["status"] == "done"

    status = _status(procs)
    assert status["queues"]["train.gpu"] == 1 and status["queues"]["train.8g"] == 1
    for run, queue in (("needs-gpu", "train.gpu"), ("needs-8g", "train.8g")):
        entry = _run(status, run)
        assert entry["queue"] == queue and entry["qualified_online"] == 0, entry
        assert entry["open_round"]["accepted"] == 0
    assert _run(status, "needs-8g")["requires"] == {"device": None, "memory_gb": 8}
    human = procs.cli("status").stdout
    assert "run needs-gpu needs a gpu: no online volunteer qualifies" in human, human

    _volunteer(procs, "workstation", "--memory-gb", "16")
    wait_until(
        lambda: procs.store.version("needs-8g") == 1, "the 8 GB run's round", processes=procs, poll=0.2
    )
    status = _status(procs)
    assert _run(status, "needs-8g")["qualified_online"] == 1
    credit = {v["name"]: v["shards_done"] for v in status["volunteers"]}
    assert credit == {"laptop": 1, "workstation": 1}, credit
    offered = {v["name"]: v["memory_gb"] for v in status["volunteers"]}
    assert offered == {"laptop": 2, "workstation": 16}, offered
    # nobody here has an accelerator: that shard is still waiting, untouched
    assert _run(status, "needs-gpu")["model_version"] == 0 and status["queues"]["train.gpu"] == 1
