"""A DP-FedAvg run end to end: epsilon per round, in status, and a budget that stops the run."""

from __future__ import annotations

import pytest

from coordinator.privacy import epsilon_after

TINY = "tests.fixtures.jobs_tiny:make_job"


def test_a_private_run_reports_epsilon_and_stops_at_its_budget(processes):
    processes.aggregator()
    processes.volunteer("bob", "--allow-job", TINY)
    budget = epsilon_after(2, 1.2, 1.0, 1e-5) * 1.001  # room for two merged rounds
    processes.json(
        "init",
        "--run",
        "r",
        "--job",
        TINY,
        "--local-steps",
        "3",
        "--shards",
        "2",
        "--deadline",
        "120",
        "--dp-clip",
        "0.5",
        "--dp-noise",
        "1.2",
        "--dp-epsilon",
        str(budget),
    )
    # act
    document = processes.json("run", "--run", "r", "--rounds", "5")
    # assert
    assert document["stopped"] == "privacy budget", processes.log_tail()
    rounds = document["rounds"]
    assert [r["status"] for r in rounds] == ["done", "done"]
    expected = [epsilon_after(n, 1.2, 1.0, 1e-5) for n in (1, 2)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(expected, rel=1e-4)
    run = processes.json("status", "--run", "r")["runs"][0]
    assert run["epsilon"] == pytest.approx(expected[-1], rel=1e-4)
    refused = processes.cli("post-round", "--run", "r")
    assert (
        refused.returncode == 2 and "privacy budget" in refused.stderr and "Traceback" not in refused.stderr
    )
    out = processes.home / "report.png"
    assert processes.cli("report", "--run", "r", "--out", str(out)).returncode == 0 and out.stat().st_size


def test_a_robust_strategy_with_differential_privacy_is_refused_at_init(processes):
    result = processes.cli(
        "init", "--run", "r", "--job", TINY, "--strategy", "median", "--dp-clip", "1", "--dp-noise", "1"
    )
    assert result.returncode == 2 and "robust strategy" in result.stderr and "Traceback" not in result.stderr
