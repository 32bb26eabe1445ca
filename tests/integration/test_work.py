"""Proof of work done (``init --work-check``): a sandbagging volunteer among honest ones, real processes."""

from __future__ import annotations

import redis

from broker import keys
from tests.conftest import Processes

TINY = "tests.fixtures.jobs_tiny:make_job"


def _two_honest_and_a_lazy_one(processes: Processes) -> None:
    """An aggregator, volunteers h1 and h2, and ``lazy``, which trains one step of ten and claims ten."""
    tiny = ("--allow-job", TINY)
    processes.aggregator()
    for name in ("h1", "h2"):
        processes.volunteer(name, *tiny)
    processes.spawn(
        "lazy",
        "-m",
        "tests.fixtures.evil_volunteer",
        "start",
        "--device",
        "cpu",
        "--name",
        "lazy",
        *tiny,
        CROWDTRAIN_TEST_ATTACK="lazy:1",
    )


def test_a_lazy_volunteer_is_rejected_for_its_work_and_earns_nothing_while_honest_ones_pass(
    processes: Processes,
) -> None:
    """One of ten local steps, claiming ten: caught within 5 rounds (a new identity's first shard
    is always replayed), no credit, reputation 0; no honest shard rejected."""
    _two_honest_and_a_lazy_one(processes)
    processes.json(
        "init",
        "--run",
        "r",
        "--job",
        TINY,
        "--local-steps",
        "10",
        "--shards",
        "3",
        "--work-check",
        "0.1",
        "--deadline",
        "60",
    )
    processes.wait_online("h1", "h2", "lazy")
    rounds: list[dict] = []
    while len(rounds) < 5 and not any(x["volunteer"] == "lazy" for r in rounds for x in r["rejections"]):
        rounds += processes.json("run", "--run", "r", "--rounds", "1")["rounds"]
    assert all(r["status"] == "done" for r in rounds), rounds
    rejections = [x for r in rounds for x in r["rejections"]]
    assert rejections and {x["volunteer"] for x in rejections} == {"lazy"}, processes.log_tail()
    assert all(x["reason"].startswith("work:") for x in rejections), rejections
    assert all(r["work_checked"] >= 1 and r["work_seconds"] >= 0 for r in rounds), rounds
    people = {v["name"]: v for v in processes.json("status")["volunteers"]}
    assert people["lazy"]["accepted"] == 0 and people["lazy"]["samples"] == 0, people["lazy"]
    assert people["lazy"]["rejected"] >= 1 and people["lazy"]["reputation"] == 0.0, people["lazy"]
    assert all(people[name]["rejected"] == 0 for name in ("h1", "h2")), people


def test_a_veteran_that_starts_sandbagging_is_replayed_and_caught_in_its_first_lazy_round(
    processes: Processes,
) -> None:
    """A volunteer with a record of 100 merged shards is checked at RATE (0.1) by the draw, but one
    of ten steps makes its upload far shorter than the others': it is replayed in that very round
    (``work.short``) and rejected, its record forfeited; the honest ones are not marked."""
    _two_honest_and_a_lazy_one(processes)
    processes.json(
        "init", "--run", "r", "--job", TINY, "--local-steps", "10", "--shards", "3", "--work-check", "0.1"
    )
    processes.wait_online("h1", "h2", "lazy")
    client = redis.Redis.from_url(processes.broker)
    for name in ("h1", "h2", "lazy"):  # veterans: checked at RATE, not on probation
        client.hset(keys.volunteer(name), "accepted", 100)
    rounds = processes.json("run", "--run", "r", "--rounds", "1")["rounds"]
    assert rounds[0]["status"] == "done", rounds
    rejections = rounds[0]["rejections"]
    assert [x["volunteer"] for x in rejections] == ["lazy"], (rounds, processes.log_tail())
    assert rejections[0]["reason"].startswith("work:"), rejections
    assert rounds[0]["work_marked"] == 1, rounds
    people = {v["name"]: v for v in processes.json("status")["volunteers"]}
    assert people["lazy"]["accepted"] == 0 and people["lazy"]["reputation"] == 0.0, people["lazy"]
