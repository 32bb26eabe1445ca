"""The volunteer as a guest, in real processes: pause mid-shard, resume, give a shard back, CPU limit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import psutil

from tests.conftest import wait_until

SLOW = "tests.fixtures.jobs_slow:make_job"
BUSY = "tests.fixtures.jobs_busy:make_job"
LEASE = 6  # seconds: a pause longer than this gives the shard back


def volunteer_cli(processes, *argv: str) -> subprocess.CompletedProcess:
    """``volunteer ARGV`` in a process of its own, as its owner runs it (the polled status runs inline)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.volunteer", *argv],
        env=processes.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=processes.home,
    )


def status(processes, name: str) -> dict:
    result = processes.volunteer_cli("status", "--name", name, "--json")
    assert result.returncode == 0, result.stderr + processes.log_tail()
    return json.loads(result.stdout)


def step(processes, name: str) -> int:
    """The step of the shard the volunteer trains now; 0 before it answers or trains."""
    result = processes.volunteer_cli("status", "--name", name, "--json")
    return (json.loads(result.stdout).get("step") or 0) if result.returncode == 0 else 0


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and everything under it."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def cpu_share(pid: int, seconds: float) -> float:
    """Cores' worth of CPU the process tree used over the next ``seconds``."""
    before, began = tree_cpu(pid), time.monotonic()
    deadline = began + seconds
    while time.monotonic() < deadline:  # measuring over a span is the point here, not waiting for it
        time.sleep(0.1)
    return (tree_cpu(pid) - before) / (time.monotonic() - began)


def test_a_paused_shard_stops_resumes_from_its_step_and_a_long_pause_gives_it_back(processes, redis_server):
    # arrange: alice trains slow shards (80 steps of 0.05 s) under a short lease
    processes.aggregator()
    alice = processes.volunteer("alice", "--allow-job", SLOW, CROWDTRAIN_TEST_STEP_SECONDS="0.05")
    processes.json(
        "init", "--run", "r", "--job", SLOW, "--local-steps", "80", "--lease", str(LEASE), "--deadline", "600"
    )
    processes.cli("post-round", "--run", "r", "--shards", "1")
    wait_until(lambda: step(processes, "alice") >= 5, "alice to train round 1", 120)

    # act: pause mid-shard
    paused = volunteer_cli(processes, "pause", "--name", "alice", "--json")
    assert paused.returncode == 0, paused.stderr
    wait_until(lambda: status(processes, "alice")["state"] == "paused", "alice to say paused", 30)
    stopped_at = wait_until(lambda: _paused_step(processes), "the trainer to stop at a step", 30)

    # assert: it uses (almost) no CPU, says why, and its shard is on disk
    assert cpu_share(alice.pid, 3.0) < 0.05
    now = status(processes, "alice")
    assert (now["state"], now["reason"], now["run"], now["shard"]) == ("paused", "manual", "r", 0)
    assert 0 < now["step"] == stopped_at < now["steps"] == 80
    assert list((processes.home / "volunteer" / "alice" / "shards").glob("r.1.0.*.safetensors"))

    # act: resume; the shard goes on from where it stopped, and its delta is accepted
    assert volunteer_cli(processes, "resume", "--name", "alice").returncode == 0
    assert status(processes, "alice")["step"] >= stopped_at
    client = redis_server.client()
    assert wait_until(lambda: _ended(client, 1), "round 1 to end", 120) == b"done"
    assert client.hget("ct:run:r:round:1", "accepted") == b"1", processes.log_tail()
    assert "resumed r round 1 shard 0 at step" in (processes.logs / "alice.log").read_text()
    alice_before = next(v for v in processes.json("status")["volunteers"] if v["name"] == "alice")
    assert alice_before["accepted"] == 1

    # arrange: bob joins, fast; round 2 has two shards, one each
    processes.volunteer("bob", "--allow-job", SLOW, CROWDTRAIN_TEST_STEP_SECONDS="0")
    wait_until(lambda: "bob" in processes.json("status")["workers_online"], "bob online", 120)
    processes.cli("post-round", "--run", "r", "--shards", "2", "--deadline", "600")
    in_round_2 = lambda: (s := status(processes, "alice"))["round"] == 2 and (s["step"] or 0) >= 3  # noqa: E731
    wait_until(in_round_2, "alice in round 2", 120)

    # act: alice pauses past her lease
    assert volunteer_cli(processes, "pause").returncode == 0  # no --name: every volunteer here
    volunteer_cli(processes, "resume", "--name", "bob")
    assert status(processes, "alice")["state"] == "paused"
    # the pause cancels alice's queues in her consumer's loop, soon after her socket answered
    shown = lambda: next(v for v in processes.json("status")["volunteers"] if v["name"] == "alice")  # noqa: E731
    wait_until(lambda: (s := shown())["online"] and s["paused"], "status to show alice online and paused", 30)
    assert wait_until(lambda: _ended(client, 2), "round 2 to end with bob", 120) == b"done"
    assert client.hget("ct:run:r:round:2", "accepted") == b"2"
    volunteer_cli(processes, "resume", "--name", "alice")
    wait_until(lambda: status(processes, "alice")["state"] == "waiting", "alice to drop her shard", 60)

    # assert: round 2 was all bob's; alice uploaded nothing for it, so her record did not move
    log = (processes.logs / "alice.log").read_text()
    assert "gave r round 2 shard" in log and "r round 2 shard" in log and "dropped" in log
    after = next(v for v in processes.json("status")["volunteers"] if v["name"] == "alice")
    assert {k: after[k] for k in ("shards_done", "accepted", "rejected")} == {
        k: alice_before[k] for k in ("shards_done", "accepted", "rejected")
    }
    assert status(processes, "alice")["shards_done"] == 1


def _paused_step(processes) -> int | None:
    """The step alice's trainer stopped at, once its checkpoint is on disk and the status agrees.

    The status says paused as soon as the owner asks, and its step can hold
    still for a moment while the trainer is still writing the checkpoint; the
    log line comes after the file is in place, so a kill after it finds it.
    """
    saved = re.findall(r"paused r round 1 shard 0 at step (\d+) \(.*\); checkpoint saved", _log(processes))
    if not saved:
        return None
    now = status(processes, "alice")["step"]
    return now if now == int(saved[-1]) else None


def _log(processes) -> str:
    path = processes.logs / "alice.log"
    return path.read_text() if path.exists() else ""


def _ended(client, number: int) -> bytes | None:
    value = client.hget(f"ct:run:r:round:{number}", "status")
    return value if value in (b"done", b"failed") else None


def test_a_volunteer_holds_its_cpu_limit_and_pauses_by_its_owners_rules(processes, tmp_path):
    # arrange: battery and idle time from files this test writes; a game this test starts
    battery, idle = tmp_path / "battery", tmp_path / "idle"
    battery.write_text("100 plugged")
    idle.write_text("3600")
    game = tmp_path / f"ctgame{os.getpid() % 10000}"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", game)
    processes.aggregator()
    dave = processes.volunteer(
        "dave",
        "--allow-job",
        BUSY,
        "--cpu-limit",
        "30",
        "--pause-on-battery",
        "--idle-minutes",
        "5",
        "--exclusive-app",
        game.name,
        CROWDTRAIN_BATTERY_FILE=str(battery),
        CROWDTRAIN_IDLE_FILE=str(idle),
        CROWDTRAIN_TEST_STEP_CPU="0.02",
    )
    # a shard that would keep one core busy for a minute
    processes.json("init", "--run", "r", "--job", BUSY, "--local-steps", "3000", "--deadline", "600")
    processes.cli("post-round", "--run", "r", "--shards", "1")
    reasons = lambda: status(processes, "dave")["reasons"]  # noqa: E731
    wait_until(lambda: processes.volunteer_cli("status").returncode == 0, "dave to listen", 120)
    wait_until(lambda: step(processes, "dave") >= 20, "dave to train", 120)

    # act / assert: --cpu-limit 30 holds its share of the machine's CPU time
    share = cpu_share(dave.pid, 10.0) / (psutil.cpu_count() or 1)
    assert share <= 0.35, share
    assert status(processes, "dave")["reason"] in ("cpu-limit", None)

    # act / assert: each signal pauses it, and its end lets it train again
    assert not {"battery", "idle", "exclusive-app"} & set(reasons())
    started = subprocess.Popen([str(game), "600"])
    try:
        wait_until(lambda: "exclusive-app" in reasons(), "the game to pause dave")
    finally:
        started.kill()
        started.wait()
    wait_until(lambda: "exclusive-app" not in reasons(), "dave to go on after the game")
    idle.write_text("10")
    wait_until(lambda: "idle" in reasons(), "input to pause dave")
    idle.write_text("3600")
    battery.write_text("50 battery")
    wait_until(lambda: reasons()[:1] == ["battery"], "the battery to pause dave")
    battery.write_text("60 plugged")  # on mains, but not charged enough yet
    assert "battery" in reasons()
    battery.write_text("95 plugged")
    wait_until(lambda: "battery" not in reasons(), "dave to go on when charged")


def test_a_volunteer_killed_while_paused_goes_on_from_its_checkpoint_after_a_restart(processes, redis_server):
    # arrange: alice pauses mid-shard, and is killed while paused
    processes.extra_env["CROWDTRAIN_VISIBILITY_TIMEOUT"] = "6"
    processes.aggregator()
    slow = {"CROWDTRAIN_TEST_STEP_SECONDS": "0.05"}
    alice = processes.volunteer("alice", "--allow-job", SLOW, **slow)
    processes.json(
        "init", "--run", "r", "--job", SLOW, "--local-steps", "80", "--lease", "4", "--deadline", "600"
    )
    processes.cli("post-round", "--run", "r", "--shards", "1")
    wait_until(lambda: step(processes, "alice") >= 5, "alice to train", 120)
    assert volunteer_cli(processes, "pause", "--name", "alice").returncode == 0
    stopped_at = wait_until(lambda: _paused_step(processes), "the trainer to stop at a step", 30)
    processes.kill(alice)
    # act: the same volunteer starts again; the shard comes back to it (its lease lapsed)
    processes.volunteer("alice", "--allow-job", SLOW, **slow)
    client = redis_server.client()
    # assert: it went on from the saved step, not from 0, and the delta was accepted
    assert wait_until(lambda: _ended(client, 1), "round 1 to end", 120) == b"done"
    assert client.hget("ct:run:r:round:1", "accepted") == b"1", processes.log_tail()
    log = (processes.logs / "alice.log").read_text()
    assert f"r round 1 shard 0: going on from step {stopped_at}" in log, log[-3000:]
