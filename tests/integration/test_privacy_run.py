"""A DP-FedAvg run end to end: epsilon per round, in status, and a budget that stops the run."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from coordinator.merging.privacy import epsilon_after
from tests.conftest import png_pixels

TINY = "tests.fixtures.jobs_tiny:make_job"


def test_a_private_run_reports_epsilon_and_stops_at_its_budget(processes):
    processes.aggregator()
    processes.volunteer("bob", "--allow-job", TINY)
    two, three = (epsilon_after(n, 1.2, 1.0, 1e-5) for n in (2, 3))
    budget = (two + three) / 2  # between epsilon(2) and epsilon(3)
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
    document = processes.json("run", "--run", "r", "--rounds", "3")
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
    # a third panel, privacy spent: 16.5 x 4.4 inches at 110 dpi (coordinator.views.report)
    assert png_pixels(out).shape[:2] == (484, 1815)


def test_a_robust_strategy_with_differential_privacy_is_refused_at_init(processes):
    result = processes.cli(
        "init", "--run", "r", "--job", TINY, "--strategy", "median", "--dp-clip", "1", "--dp-noise", "1"
    )
    assert result.returncode == 2 and "robust strategy" in result.stderr and "Traceback" not in result.stderr


def test_noise_is_really_added_and_a_tiny_clip_barely_moves_the_model(processes):
    processes.aggregator()
    processes.volunteer("bob", "--allow-job", TINY)
    flags = ["--job", TINY, "--local-steps", "3", "--shards", "2", "--deadline", "120", "--dp-clip"]
    processes.json("init", "--run", "tiny-clip", *flags, "1e-6", "--dp-noise", "1")
    processes.json("init", "--run", "noisy", *flags, "0.5", "--dp-noise", "1")
    processes.json("init", "--run", "quiet", *flags, "0.5", "--dp-noise", "0")
    moved = {}
    for run in ("tiny-clip", "noisy", "quiet"):
        assert processes.json("run", "--run", run, "--rounds", "1")["rounds"][0]["status"] == "done"
        before, after = (_weights(processes, run, v) for v in (0, 1))
        moved[run] = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved["tiny-clip"] < 1e-4, moved  # at most C plus noise of std Z*C = 1e-6
    # the same clipped mean, with and without noise of std Z*C/voices = 0.5: far apart
    assert moved["noisy"] > 5 * moved["quiet"], moved


def _weights(processes, run: str, version: int) -> dict:
    out = processes.home / f"{run}-{version}.safetensors"
    result = processes.cli("export", "--run", run, "--version", str(version), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return load_file(out)


def test_adaptive_clipping_moves_the_clip_and_accounts_for_it(processes):
    processes.aggregator()
    processes.volunteer("bob", "--allow-job", TINY)
    flags = ["--local-steps", "3", "--shards", "2", "--deadline", "120", "--dp-clip", "10", "--dp-noise", "1"]
    processes.json(
        "init", "--run", "r", "--job", TINY, *flags, "--dp-quantile", "0.5", "--dp-count-noise", "0.1"
    )
    record = processes.json("run", "--run", "r", "--rounds", "1")["rounds"][0]
    assert record["status"] == "done", processes.log_tail()
    assert record["epsilon"] == pytest.approx(epsilon_after(1, 1.0, 1.0, 1e-5, count_noise=0.1), rel=1e-4)
    run = processes.json("status", "--run", "r")["runs"][0]
    assert run["dp_clip"] < 10  # the tiny job's deltas all fit far under C = 10: it shrinks
