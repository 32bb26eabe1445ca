"""The coordinator's edges with real processes: abort-round, export from disk, a full Redis,
where monitor and /metrics listen, and a volunteer's broker password kept out of ``ps``."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from broker import keys
from tests.conftest import TINY_CHARLM, Processes, RedisServer, free_port, wait_until

PROC = Path("/proc")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _init(processes: Processes, run: str, *extra: str) -> dict[str, Any]:
    return processes.json("init", "--run", run, "--job", "charlm", *TINY_CHARLM, *extra)


def _listening_hosts(port: int) -> set[str]:
    """Local addresses (IPv4, dotted) with a TCP socket listening on ``port``."""
    hosts = set()
    for line in (PROC / "net" / "tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port_hex = fields[1].split(":")
        if int(port_hex, 16) == port and fields[3] == LISTEN:
            hosts.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return hosts


def _http_status(url: str, auth: str | None = None) -> int | None:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _command_lines() -> Iterator[bytes]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                yield (entry / "cmdline").read_bytes()
            except OSError:
                continue  # it ended meanwhile


# --- abort-round ----------------------------------------------------------------------------


def test_abort_round_fails_the_open_round_and_the_next_post_opens_round_2(processes: Processes):
    # arrange: a run and a round posted with no volunteer running, and a `post-round --wait` on it
    _init(processes, "demo", "--shards", "2", "--deadline", "600")
    waiter = subprocess.Popen(
        [sys.executable, "-m", "cli.coordinator", "post-round", "--run", "demo", "--wait", "--json"],
        env=processes.env(),
        cwd=processes.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: processes.json("status", "--run", "demo")["runs"][0]["open_round"],
            "round 1 to open",
            processes=processes,
        )

        # act
        aborted = processes.json("abort-round", "--run", "demo")
        out, err = waiter.communicate(timeout=120)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(30)

    # assert: the abort, the waiting post-round's document, status, then round 2
    assert aborted == {"run": "demo", "round": 1, "status": "failed", "reason": "aborted"}
    assert waiter.returncode == 0, err
    record = json.loads(out)["rounds"][0]
    assert (record["round"], record["status"], record["reason"]) == (1, "failed", "aborted")
    assert json.loads(out)["final"]["model_version"] == 0
    status = processes.json("status", "--run", "demo")["runs"][0]
    assert status["open_round"] is None and status["model_version"] == 0
    assert processes.json("post-round", "--run", "demo")["round"] == 2
    assert processes.json("abort-round", "--run", "demo")["round"] == 2
    again = processes.cli("abort-round", "--run", "demo")
    _one_line_error(again, "no round in progress", "round 2 is failed")


def test_abort_round_with_no_round_in_progress_exits_2(processes: Processes):
    _init(processes, "demo")
    _one_line_error(processes.cli("abort-round", "--run", "demo", "--json"), "demo", "no round in progress")


# --- export from the checkpoint on disk -----------------------------------------------------


def test_export_reads_a_version_that_left_redis_from_its_checkpoint(
    processes: Processes, redis_server: RedisServer
):
    # arrange: version 0 exported while Redis still holds it, then its blob deleted
    _init(processes, "demo")
    from_redis = processes.cli("export", "--run", "demo", "--version", "0", "--out", "redis.safetensors")
    assert from_redis.returncode == 0, from_redis.stderr
    admin = redis_server.client()
    assert admin.delete(keys.model("demo", 0)) == 1

    # act
    from_disk = processes.cli("export", "--run", "demo", "--version", "0", "--out", "disk.safetensors")

    # assert: the same weights as before, which are the checkpoint's
    assert from_disk.returncode == 0, from_disk.stderr
    before = load_file(processes.home / "redis.safetensors")
    after = load_file(processes.home / "disk.safetensors")
    checkpoint = load_file(processes.home / "runs" / "demo" / "model-v000000.safetensors")
    assert before.keys() == after.keys() == checkpoint.keys()
    for name in before:
        assert after[name].dtype == torch.float32
        assert torch.equal(before[name], after[name]) and torch.equal(after[name], checkpoint[name])
    # neither in Redis nor on disk: a usage error naming the version
    (processes.home / "runs" / "demo" / "model-v000000.safetensors").unlink()
    gone = processes.cli("export", "--run", "demo", "--out", "gone.safetensors")
    _one_line_error(gone, "version 0", "demo")
    assert not (processes.home / "gone.safetensors").exists()


# --- a full Redis ---------------------------------------------------------------------------


def test_init_into_a_full_redis_exits_2_and_leaves_no_half_created_run(
    processes: Processes, redis_server: RedisServer
):
    # arrange: one small run written, then Redis capped at 1 MB above what it uses
    _init(processes, "small")
    admin = redis_server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 1_000_000)
    bigger = [*TINY_CHARLM, "--job-arg", "width=256", "--job-arg", "layers=2", "--job-arg", "heads=4"]

    # act: a model of about 8 MB
    result = processes.cli("init", "--run", "big", "--job", "charlm", *bigger)

    # assert: one line, and nothing of run 'big' anywhere
    _one_line_error(result, "maxmemory", "big")
    assert admin.keys("ct:run:big:*") == []
    assert b"big" not in admin.smembers(keys.runs())
    assert not (processes.home / "runs" / "big").exists()
    runs = processes.json("status")["runs"]
    assert [r["run"] for r in runs] == ["small"]


def test_a_one_shot_command_refused_by_a_full_redis_is_one_line(
    processes: Processes, redis_server: RedisServer
):
    # arrange: every write that needs memory is refused from now on
    _init(processes, "small")
    admin = redis_server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)

    # act
    result = processes.cli("post-round", "--run", "small")

    # assert
    _one_line_error(result, "maxmemory")
    assert admin.get(keys.run_rounds("small")) is None
    assert admin.llen(keys.TRAIN_QUEUE) == 0


# --- where monitor and /metrics listen ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "host"), [([], "127.0.0.1"), (["--metrics-address", "0.0.0.0"], "0.0.0.0")]
)
def test_metrics_listen_on_loopback_unless_told_otherwise(processes: Processes, flags, host):
    port = free_port()
    processes.aggregator("aggregator", "--metrics-port", str(port), *flags)
    wait_until(
        lambda: _http_status(f"http://127.0.0.1:{port}/metrics") == 200, "/metrics", processes=processes
    )
    assert _listening_hosts(port) == {host}


def test_monitor_listens_on_loopback_and_takes_its_login_from_the_environment(processes: Processes):
    # arrange
    port = free_port()
    secret = "ops:f-pw-" + str(port)

    # act
    processes.spawn(
        "monitor", "-m", "cli.coordinator", "monitor", "--port", str(port), FLOWER_BASIC_AUTH=secret
    )

    # assert: the login works, only on loopback, and is on no process's command line
    base = f"http://127.0.0.1:{port}/"
    wait_until(lambda: _http_status(base) == 401, "Flower to ask for its login", processes=processes)
    assert _http_status(base, auth=secret) == 200
    assert _http_status(base, auth="ops:wrong") == 401
    assert _listening_hosts(port) == {"127.0.0.1"}
    assert not [line for line in _command_lines() if secret.encode() in line]


def test_monitor_on_a_port_in_use_exits_2_in_one_line(processes: Processes):
    port = free_port()
    processes.aggregator("aggregator", "--metrics-port", str(port))
    wait_until(
        lambda: _http_status(f"http://127.0.0.1:{port}/metrics") == 200, "/metrics", processes=processes
    )
    _one_line_error(processes.cli("monitor", "--port", str(port)), str(port), "cannot listen")
    _one_line_error(processes.cli("aggregator", "--metrics-port", str(port)), str(port), "cannot listen")


def _worker_ready(processes: Processes, name: str) -> bool:
    """Celery logs "NAME@host ready." once the worker is connected to its broker (no broker to ping here)."""
    text = processes.log(name)
    return f"{name}@" in text and " ready." in text


# --- a volunteer's broker password ----------------------------------------------------------


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server that requires a password; its ``url`` holds it."""
    password = "s3cret-" + str(free_port())
    server = RedisServer(tmp_path / "redis-pw", extra=["--requirepass", password])
    server.url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    server.start()
    yield server, password
    server.stop()


def test_volunteer_reads_its_broker_from_a_file_and_no_command_line_shows_the_password(
    tmp_path: Path, password_redis: tuple[RedisServer, str]
):
    # arrange
    server, password = password_redis
    secret_file = tmp_path / "broker.url"
    secret_file.write_text(server.url + "\n# the first line is the URL\n")
    processes = Processes(tmp_path / "home", "")
    try:
        # act: no broker in the environment, only the file
        processes.volunteer("filed", "--broker-file", str(secret_file), CROWDTRAIN_BROKER_URL="")
        # assert: it connects to that Redis, and its password is on no command line
        wait_until(
            lambda: _worker_ready(processes, "filed"),
            "the volunteer to connect to the broker",
            processes=processes,
        )
        log = (processes.logs / "filed.log").read_text()
        assert f"@127.0.0.1:{server.port}/0" in log  # Celery's banner: the file's broker
        assert not [line for line in _command_lines() if password.encode() in line]
        assert "visible to other users" not in log
    finally:
        processes.stop_all()


def test_volunteer_warns_once_when_broker_flag_holds_a_password(
    tmp_path: Path, password_redis: tuple[RedisServer, str]
):
    server, _password = password_redis
    processes = Processes(tmp_path / "home", "")
    try:
        processes.volunteer("flagged", "--broker", server.url, CROWDTRAIN_BROKER_URL="")
        wait_until(
            lambda: _worker_ready(processes, "flagged"),
            "the volunteer to connect to the broker",
            processes=processes,
        )
        log = (processes.logs / "flagged.log").read_text()
        assert log.count("visible to other users of this machine") == 1, log
        assert "--broker-file" in log and "CROWDTRAIN_BROKER_URL" in log
    finally:
        processes.stop_all()
