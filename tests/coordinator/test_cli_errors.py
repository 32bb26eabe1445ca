"""Bad input: one clear line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port


def _coordinator(tmp_path, *argv, broker=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CROWDTRAIN_HOME": str(tmp_path / "home")}
    if broker:
        env["CROWDTRAIN_BROKER_URL"] = broker
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def _assert_one_clear_line(result, *words):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--job", "nosuchjob"], ["nosuchjob"]),
        (["--job", "charlm", "--job-arg", "layers"], ["layers", "key=value"]),
        (["--job", "charlm", "--compression", "topk:2"], ["topk:2"]),
        (["--job", "charlm", "--compression", "zstd"], ["zstd"]),
        (["--job", "charlm", "--strategy", "krum:x"], ["krum:x"]),
        (["--job", "charlm", "--job-arg", "colour=3"], ["colour"]),
    ],
)
def test_init_refuses_bad_input_before_writing_anything(tmp_path, redis_server, flags, words):
    result = _coordinator(tmp_path, "init", "--run", "r1", *flags, broker=redis_server.url)
    _assert_one_clear_line(result, *words)
    assert redis_server.client().keys("ct:*") == []
    assert not (tmp_path / "home" / "runs").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["post-round", "--run", "ghost"],
        ["run", "--run", "ghost", "--rounds", "1"],
        ["status", "--run", "ghost"],
        ["export", "--run", "ghost", "--out", "x.safetensors"],
        ["report", "--run", "ghost", "--out", "x.png"],
    ],
)
def test_unknown_run_is_one_line_naming_the_run(tmp_path, redis_server, command):
    result = _coordinator(tmp_path, *command, broker=redis_server.url)
    _assert_one_clear_line(result, "ghost")


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["post-round", "--run", "r1"],
        ["init", "--run", "r1", "--job", "charlm"],
    ],
)
def test_unreachable_broker_is_one_line_and_exit_2(tmp_path, command):
    broker = f"redis://127.0.0.1:{free_port()}/0"
    result = _coordinator(tmp_path, *command, broker=broker)
    _assert_one_clear_line(result, "cannot reach the broker", str(broker.split(":")[-1].split("/")[0]))


def test_quorum_that_is_neither_count_nor_fraction_is_refused(tmp_path, redis_server):
    result = _coordinator(
        tmp_path, "init", "--run", "r1", "--job", "charlm", "--quorum", "1.5", broker=redis_server.url
    )
    _assert_one_clear_line(result, "--quorum")


def test_every_command_has_help(tmp_path):
    for command in [
        "quickstart",
        "init",
        "post-round",
        "run",
        "aggregator",
        "status",
        "export",
        "report",
        "monitor",
    ]:
        result = _coordinator(tmp_path, command, "--help")
        assert result.returncode == 0 and "usage: coordinator " + command in result.stdout
