"""Invitations, joining, the volunteer list and revocation, on a real Redis 7 with real processes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from broker import keys
from broker.settings import Settings
from tests.conftest import Processes, wait_until
from volunteer.errors import VolunteerError
from volunteer.joining import join

TINY = "tests.fixtures.jobs_tiny:make_job"
WAIT = 120.0


def _join(procs: Processes, home: Path, token: str, *argv: str) -> subprocess.Popen:
    """``volunteer join TOKEN`` in a process of its own, with no broker but the token."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli.volunteer", "join", token, *argv],
        env=procs.env(CROWDTRAIN_HOME=str(home), CROWDTRAIN_BROKER_URL=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=procs.home,
    )


def _start(procs: Processes, name: str, home: Path) -> subprocess.Popen:
    """``volunteer start`` with neither --broker, CROWDTRAIN_BROKER_URL nor --name: what join saved."""
    env = {"CROWDTRAIN_HOME": str(home), "CROWDTRAIN_BROKER_URL": ""}
    return procs.spawn(name, "-m", "cli.volunteer", "start", "--device", "cpu", "--allow-job", TINY, **env)


def _round(admin: redis.Redis, number: int) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in admin.hgetall(keys.round_("demo", number)).items()}


def test_invited_volunteers_join_train_are_listed_and_one_revoked_leaves_nothing_merged(
    admin_processes, tmp_path
):
    # arrange: an invitation for two
    procs, admin = admin_processes
    aggregator = procs.aggregator()
    token = procs.json("invite", "--uses", "2")["token"]
    assert token.startswith(f"redis://{keys.JOINER}:")
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol")}
    # act: two join with it, a third is refused
    joining = {name: _join(procs, homes[name], token, "--name", name) for name in ("alice", "bob")}
    for process in joining.values():
        _, err = process.communicate(timeout=WAIT)
        assert process.returncode == 0, err + procs.log_tail()
    carol = _join(procs, homes["carol"], token, "--name", "carol")
    _, err = carol.communicate(timeout=WAIT)
    # assert
    assert carol.returncode == 2 and len(err.strip().splitlines()) == 1 and "invitation" in err, err
    assert not (homes["carol"] / "volunteer-credentials.json").exists()
    saved = homes["alice"] / "volunteer-credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    alice_url = json.loads(saved.read_text())["url"]
    assert alice_url.startswith("redis://alice:") and redis.Redis.from_url(alice_url).ping()

    # a joined volunteer, started with no broker and no name, trains a round
    alice = _start(procs, "alice", homes["alice"])
    procs.json("init", "--run", "demo", "--job", TINY, "--local-steps", "3", "--shards", "2", "--lease", "6")
    document = procs.json("run", "--run", "demo", "--rounds", "1", "--deadline", "60")
    assert document["rounds"][0]["status"] == "done" and document["rounds"][0]["accepted"] == 2, (
        procs.log_tail()
    )
    listed = {v["name"]: v for v in procs.json("volunteers")["volunteers"]}
    assert listed["alice"]["accepted"] == 2 and listed["alice"]["online"], listed
    assert 0 <= listed["alice"]["reputation"] <= 1 and listed["alice"]["age"] >= 0
    assert listed["alice"]["via"] == "invite" and not listed["alice"]["revoked"]
    assert listed["bob"]["accepted"] == 0 and not listed["bob"]["online"]
    assert "carol" not in listed

    # round 2: alice holds one shard (another volunteer counts as online), and it is accepted
    admin.zadd(keys.seen(), {"phantom": time.time() + 3600})
    procs.json("post-round", "--run", "demo", "--shards", "2", "--quorum", "2", "--deadline", "90")
    wait_until(lambda: admin.hlen(keys.round_accepted("demo", 2)) == 1, "alice's upload to be accepted", WAIT)
    left = keys.upload("alice", "demo", 2, 1, "a" * 32)  # an upload she leaves, not yet announced
    redis.Redis.from_url(alice_url).set(left, b"junk", ex=600)

    # act: revoke her
    revoked = procs.json("revoke", "alice")

    # assert: her user and connections are gone, her pending work with them
    assert revoked["accepted_withdrawn"] == 1 and revoked["uploads_deleted"] >= 1, revoked
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(alice_url).ping()
    users = lambda: {c.get("user") for c in admin.client_list()}  # noqa: E731
    wait_until(lambda: "alice" not in users(), "alice's connections to close", WAIT)
    assert admin.exists(left) == 0
    assert _round(admin, 2)["accepted"] == "0" and admin.hlen(keys.round_accepted("demo", 2)) == 0
    # bob takes the round over; what alice left is never merged nor credited
    admin.zrem(keys.seen(), "phantom")
    _start(procs, "bob", homes["bob"])
    wait_until(lambda: _round(admin, 2).get("status") in ("done", "failed"), "round 2 to end", WAIT)
    assert _round(admin, 2)["status"] == "done", _round(admin, 2)
    listed = {v["name"]: v for v in procs.json("volunteers")["volunteers"]}
    assert listed["alice"]["accepted"] == 2 and listed["alice"]["revoked"] and not listed["alice"]["online"]
    assert listed["bob"]["accepted"] == 2, listed
    assert aggregator.poll() is None and alice.poll() is None, procs.log_tail()


def test_forged_join_requests_are_refused_and_the_aggregator_answers_the_next(admin_processes, tmp_path):
    # arrange
    procs, admin = admin_processes
    aggregator = procs.aggregator()
    token = procs.json("invite", "--uses", "3")["token"]
    joiner = redis.Redis.from_url(token)
    secret = token.split(":")[2].split("@")[0]
    nonces = {why: f"{n:064x}" for n, why in enumerate(("bad secret", "default", "joiner", "newline"), 1)}
    # act: requests no honest volunteer sends
    forged = [
        keys.join_request("0" * 64, nonces["bad secret"], "mallory"),
        keys.join_request(secret, nonces["default"], "default"),
        keys.join_request(secret, nonces["joiner"], keys.JOINER),
        f"join|{secret}|{nonces['newline']}|alice\nx",
        "not a request",
        b"\xff\xfe" * 40,
        "join|" + "x" * 10_000,
        json.dumps({"secret": secret, "name": "mallory", "nonce": "1" * 64}),
    ]
    joiner.rpush(keys.join_requests(), *forged)
    replies = {why: keys.join_reply(nonce) for why, nonce in nonces.items()}
    wait_until(lambda: admin.llen(keys.join_requests()) == 0, "the requests to be taken", WAIT)
    wait_until(
        lambda: all(admin.exists(replies[w]) for w in ("bad secret", "default", "joiner")), "answers", WAIT
    )
    # assert: each refused, no use spent, no user made
    answers = {why: json.loads(admin.get(key)) for why, key in replies.items() if admin.exists(key)}
    assert set(answers) == {"bad secret", "default", "joiner"}, answers
    assert not any(a["ok"] for a in answers.values()) and "reserved" in answers["default"]["reason"]
    assert admin.hget(keys.invitation(_digest(secret)), "uses") == b"3"
    assert admin.execute_command("ACL", "GETUSER", "mallory") is None
    # the joiner user can ask to join and take an answer, nothing else
    for call in (
        lambda: joiner.get(keys.invitation(_digest(secret))),
        lambda: joiner.lrange(keys.join_requests(), 0, -1),
        lambda: joiner.lpop(keys.join_requests()),
        lambda: joiner.set(keys.join_reply("2" * 64), "forged"),
        lambda: joiner.keys("*"),
        lambda: joiner.scan(),
        lambda: joiner.get("ct:run:demo:config"),
        lambda: joiner.execute_command("ACL", "SETUSER", "mallory", "on", ">pw", "+@all", "~*"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    # the aggregator is up and answers the next honest join; a name taken is refused
    dave = join(Settings(home=tmp_path / "dave"), token, "dave")
    dave_url = json.loads(Path(dave["credentials"]).read_text())["url"]
    with pytest.raises(VolunteerError, match="taken"):
        join(Settings(home=tmp_path / "dave-again"), token, "dave")
    assert redis.Redis.from_url(dave_url).ping(), "a refused join replaced dave's password"
    assert admin.hget(keys.invitation(_digest(secret)), "uses") == b"2"
    assert aggregator.poll() is None, procs.log_tail()
    # revoking a name no one has: one line, exit 2
    result = procs.cli("revoke", "nobody")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def _digest(secret: str) -> str:
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()
