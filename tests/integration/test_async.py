"""Asynchronous runs (``init --mode async``): a slow volunteer holds nobody up, exactly once still."""

from __future__ import annotations

import json
import subprocess
import sys

from coordinator.store import Store
from tests.conftest import wait_until

SLOW = "tests.fixtures.jobs_slow:make_job"


def test_an_async_run_outpaces_its_slow_volunteer_survives_its_aggregator_and_merges_each_delta_once(
    processes, redis_server
):
    store = Store(redis_server.client())
    first = processes.aggregator("first")
    processes.volunteer("fast", "--allow-job", SLOW, CROWDTRAIN_TEST_STEP_SECONDS="0.05")
    processes.volunteer("slow", "--allow-job", SLOW, CROWDTRAIN_TEST_STEP_SECONDS="0.5")  # 10x slower
    init = processes.json(
        "init", "--run", "a", "--job", SLOW, "--local-steps", "4", "--shards", "4",
        "--mode", "async", "--buffer", "2", "--max-staleness", "1", "--deadline", "120",
    )  # fmt: skip
    # post-round has no meaning without rounds
    refused = processes.cli("post-round", "--run", "a")
    assert refused.returncode == 2 and "asynchronous" in refused.stderr
    run = subprocess.Popen(
        [sys.executable, "-m", "cli.coordinator", "run", "--run", "a", "--rounds", "8", "--json"],
        env=processes.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: store.version("a") >= 3, "three versions", processes=processes)
        processes.kill(first)  # mid-run: the replacement must go on from the version it finds
        processes.aggregator("second")
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err[-3000:] + processes.log_tail()
    document = json.loads(out)

    versions = [r["model_version"] for r in document["rounds"]]
    assert versions == list(range(versions[0], 9)) and versions[0] <= 1, versions  # one entry per version
    # jobs still out when run returns keep training: their deltas fill the open buffer
    assert document["final"]["model_version"] >= 8 and store.version("a") >= 8
    # K=2 per buffer; a delta or two more may arrive before the merge takes it
    assert all(r["status"] == "done" and 1 <= r["accepted"] <= 4 for r in document["rounds"])
    assert all(r["staleness"] <= 1 for r in document["rounds"])
    assert document["final"]["eval_loss"] < init["initial"]["eval_loss"]
    # the slow volunteer's deltas come back versions too late: rejected as stale, not merged
    wait_until(
        lambda: any(
            "stale" in x["reason"] and x["volunteer"] == "slow"
            for n in range(1, store.rounds.count("a") + 1)
            for x in store.rounds.rejections("a", n)
        ),
        "a stale delta from the slow volunteer",
        processes=processes,
    )
    # each accepted copy counted in one buffer only, across both aggregators
    copies = [
        key
        for n in range(1, store.rounds.count("a") + 1)
        for key in store.rounds.accepted_uploads("a", n).values()
    ]
    assert len(copies) == len(set(copies))
