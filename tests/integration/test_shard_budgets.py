"""Time-budgeted shards: a slow volunteer sends fewer samples on time, not a late delta."""

from __future__ import annotations

SLOW = "tests.fixtures.jobs_slow:make_job"


def test_a_time_budget_ends_each_shard_early_and_merges_by_samples(processes):
    processes.aggregator()
    processes.volunteer("slow", "--allow-job", SLOW, CROWDTRAIN_TEST_STEP_SECONDS="0.2")
    processes.json(
        "init",
        "--run",
        "r",
        "--job",
        SLOW,
        "--local-steps",
        "1000",
        "--shard-seconds",
        "1",
        "--shards",
        "2",
        "--deadline",
        "600",
    )
    # act: 1000 steps of 0.2 s would take 200 s a shard; the budget is 1 s
    record = processes.json("run", "--run", "r", "--rounds", "1")["rounds"][0]
    # assert
    assert record["status"] == "done" and record["accepted"] == 2, processes.log_tail()
    batch = 8  # the tiny job's batch_size
    assert 2 * batch <= record["samples"] <= 2 * 10 * batch, record
    slow = next(v for v in processes.json("status")["volunteers"] if v["name"] == "slow")
    assert slow["samples"] == record["samples"]
    assert 0 < slow["samples_per_second"] <= 1.5 * batch / 0.2, slow
