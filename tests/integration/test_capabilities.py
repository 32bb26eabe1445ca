"""Capability claims against real processes: a volunteer that fakes its challenge is found out.

Both volunteers run on least-privilege ACL users and claim 16 GB. The liar
(``tests.fixtures.lazy_prover``) answers its challenge with a random product
and trains honestly: its claims show false in ``status --json``, and the
trusted side refuses it the lease of a run that needs 8 GB, which the honest
volunteer, whose claims show true, then trains beside the liar: refused, the
liar stops taking that run's queue, and the trusted side posts the shard
again at the refusal, so the round waits for no re-offer.
"""

from __future__ import annotations

import pytest
import redis

from broker import keys
from coordinator.store import Store
from tests.conftest import wait_until

TINY = "tests.fixtures.jobs_tiny:make_job"


@pytest.fixture
def procs(admin_processes):
    procs, admin = admin_processes
    procs.store = Store(admin)
    procs.urls = {}
    return procs


def _volunteer(procs, name: str, *argv: str, **env: str):
    url = procs.json("volunteer-credentials", name)["url"]
    procs.urls[name] = url
    return procs.spawn(
        name,
        *argv,
        "start",
        "--device",
        "cpu",
        "--name",
        name,
        "--allow-job",
        TINY,
        "--memory-gb",
        "16",
        CROWDTRAIN_BROKER_URL=url,
        **env,
    )


def test_a_faked_challenge_marks_the_claims_false_and_routing_stops_trusting_them(procs):
    procs.aggregator()
    liar = _volunteer(procs, "liar", "-m", "tests.fixtures.lazy_prover", CROWDTRAIN_TEST_CHALLENGE="random")
    _volunteer(procs, "honest", "-m", "cli.volunteer")
    procs.wait_online("liar", "honest")
    # the honest volunteer paused (it consumes nothing), so the liar takes the shard first
    assert procs.volunteer_cli("pause", "--name", "honest").returncode == 0
    wait_until(lambda: "Canceling queue train.8g" in procs.log("honest"), "honest to pause", processes=procs)
    # the default lease (20 s): a shard nobody takes is offered again 10 s after its last offer
    needs = ("--min-memory-gb", "6.5")
    procs.json("init", "--run", "big", "--job", TINY, "--local-steps", "2", "--shards", "1", *needs)
    number = procs.json("post-round", "--run", "big", "--deadline", "300")["round"]

    def refused() -> bool:
        return any("capability: memory claim failed" in str(r.get("skipped")) for r in procs.results("liar"))

    wait_until(refused, "the liar's lease refused for its failed memory claim", processes=procs)
    assert procs.volunteer_cli("resume", "--name", "honest").returncode == 0  # beside the liar, still running
    wait_until(lambda: procs.store.version("big") == 1, "the 8 GB run's round", processes=procs, poll=0.2)
    # the shard went out again at the refusal, and never waited for a re-offer: the liar took the
    # routed queue's message once and no more, so the copy posted at the refusal was the honest one's
    offers = procs.store.redis.hgetall(keys.offers("big", number))
    assert offers.get(b"0:refused") == b"1" and b"0:waited" not in offers, offers
    assert len(procs.results("liar")) == 1, procs.results("liar")
    assert "not taking train.8g" in procs.log("liar"), procs.log_tail()
    assert liar.poll() is None

    def trained() -> dict | None:  # credit (and the check of its training speed) follows the commit
        document = procs.json("status")
        honest = next((v for v in document["volunteers"] if v["name"] == "honest"), None)
        return document if honest and (honest["claims"] or {}).get("samples_per_second") else None

    document = wait_until(trained, "the honest volunteer's credit", processes=procs)
    claims = {v["name"]: v["claims"] for v in document["volunteers"]}
    liar, honest = claims["liar"], claims["honest"]
    assert liar["memory_gb"] == {"claimed": 16.0, "verified": False, "proven_gb": 0.0}, liar
    assert liar["speed_gflops"]["verified"] is False and liar["reason"] == "wrong product", liar
    assert honest["memory_gb"]["verified"] is True and honest["memory_gb"]["claimed"] == 16.0, honest
    assert honest["speed_gflops"]["verified"] is True and honest["reason"] is None, honest
    assert honest["samples_per_second"]["verified"] is True, honest
    assert liar["samples_per_second"] is None  # it trained nothing to compare
    credit = {v["name"]: v["shards_done"] for v in document["volunteers"]}
    assert credit == {"liar": 0, "honest": 1}, credit

    # the liar's user can write neither the honest one's answers nor any verdict or challenge
    liar_client = redis.Redis.from_url(procs.urls["liar"])
    for write in (
        lambda: liar_client.set("ct:grant:honest:" + "ab" * 16 + ":commit", b"x"),
        lambda: liar_client.set("ct:claims:liar", b"{}"),
        lambda: liar_client.hset("ct:challenge:liar", "deadline", "1e12"),
        lambda: liar_client.sadd("ct:claimants", "nobody"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()


def test_a_volunteer_refused_for_its_claims_takes_the_routed_queue_again_at_its_next_challenge(procs):
    procs.aggregator()
    # its challenges 3 s apart, not an hour: the trusted side answers the second `too soon` (at most
    # one per 30 s), so the claim stays failed and the lease is refused again
    _volunteer(
        procs,
        "liar",
        "-m",
        "tests.fixtures.lazy_prover",
        CROWDTRAIN_TEST_CHALLENGE="random",
        CROWDTRAIN_TEST_CHALLENGE_PERIOD="3",
    )
    procs.json("init", "--run", "big", "--job", TINY, "--shards", "1", "--min-memory-gb", "6.5")
    procs.json("post-round", "--run", "big", "--deadline", "300")

    def refusals() -> list[dict]:
        return [r for r in procs.results("liar") if "capability:" in str(r.get("skipped"))]

    wait_until(lambda: len(refusals()) >= 2, "the liar's second refusal", processes=procs)
    log = procs.log("liar")
    first = log.index("Canceling queue train.8g")
    back = log.index("Started consuming from train.8g", first)  # its next challenge came due
    assert log.index("Canceling queue train.8g", back) > back  # refused again: gone again
    assert "capability challenge refused: too soon" in log
