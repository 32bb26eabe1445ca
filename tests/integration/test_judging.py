"""Judging honest work on the job matrix (tests.fixtures.jobs_small): no honest delta lost.

Real aggregator and volunteer processes on a real Redis, the volunteers
trusting the small jobs with ``--allow-job``; every test here failed before
the judging it names was changed.
"""

from __future__ import annotations

from tests.conftest import Processes

LINEAR = "tests.fixtures.jobs_small:linear"
CLICK = "tests.fixtures.jobs_small:click"


def _run(processes: Processes, job: str, names: tuple[str, ...], rounds: int, *flags: str) -> dict:
    processes.aggregator()
    for name in names:
        processes.volunteer(name, "--allow-job", job)
    processes.json(
        "init", "--run", "r", "--job", job, "--compression", "none", "--shards", str(len(names)), *flags
    )
    processes.wait_online(*names)
    return processes.json("run", "--run", "r", "--rounds", str(rounds))


def test_a_zero_initialised_model_trained_by_two_volunteers_learns(processes):
    """The sparse click model starts at zero: two voices, so the norm screen has no crowd."""
    document = _run(processes, CLICK, ("ann", "ben"), 3, "--deadline", "120")
    rounds = document["rounds"]
    assert [r["status"] for r in rounds] == ["done"] * 3, rounds
    assert [x for r in rounds for x in r["rejections"]] == [], processes.log_tail()
    assert all(r["accepted"] == 2 for r in rounds), rounds
    assert document["final"]["eval_loss"] < document["initial"]["eval_loss"]


def test_four_honest_volunteers_on_a_noisy_tiny_regression_lose_no_delta_to_the_probe(processes):
    """17 parameters, label noise 0.5: the probe's gains reach its own noise within a few rounds."""
    names = ("h1", "h2", "h3", "h4")
    flags = ("--job-arg", "noise=0.5", "--optimizer", "sgd", "--lr", "0.3", "--local-steps", "30")
    document = _run(processes, LINEAR, names, 6, *flags, "--deadline", "120")
    rounds = document["rounds"]
    assert [r["status"] for r in rounds] == ["done"] * 6, rounds
    assert [x for r in rounds for x in r["rejections"]] == [], processes.log_tail()
    assert document["final"]["eval_loss"] < document["initial"]["eval_loss"]
