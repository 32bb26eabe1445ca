"""Bad input: one clear line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from cli.coordinator import main
from tests.conftest import ROOT, TINY_CHARLM, free_port


def _coordinator(tmp_path, *argv, broker=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CROWDTRAIN_HOME": str(tmp_path / "home")}
    if broker:
        env["CROWDTRAIN_BROKER_URL"] = broker
    return subprocess.run(
        [sys.executable, "-m", "cli.coordinator", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


@pytest.fixture
def in_process(tmp_path, redis_server, monkeypatch, capsys):
    """``coordinator ARGS`` run by ``main()`` in this process: the same parser, no torch start-up cost."""
    monkeypatch.setenv("CROWDTRAIN_BROKER_URL", redis_server.url)
    monkeypatch.setenv("CROWDTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> subprocess.CompletedProcess:
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, captured.out, captured.err)

    return run


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
        (["--job", "charlm", "--compression", "topk:0.01+int2@many"], ["many", "size threshold"]),
        (["--job", "charlm", "--compression", "topk:0.01+int2@4096:topk:0.1"], ["small-tensor codec"]),
        (["--job", "charlm", "--strategy", "krum:x"], ["krum:x"]),
        (["--job", "charlm", "--job-arg", "colour=3"], ["colour"]),
        (["--job", "charlm", "--min-memory-gb", "100000"], ["--min-memory-gb"]),
        (["--job", "charlm", "--require", "tpu"], ["--require"]),
        (["--job", "charlm", "--verify", "vibes"], ["--verify"]),
        (["--job", "charlm", "--replicate", "1.5"], ["--replicate"]),
        (["--job", "charlm", "--probe-voices", "4"], ["--probe-voices", "8 to"]),
        (["--job", "charlm", "--probe-voices", "many"], ["--probe-voices"]),
        (["--job", "charlm", "--replicate", ".5", "--dp-clip", "1", "--dp-noise", "1"], ["--replicate"]),
        (["--job", "gpt", "--job-arg", "corpus=/nonexistent/*.txt"], ["matches no files", "corpus="]),
        (["--job", "charlm", "--mode", "async"], ["--buffer"]),
        (["--job", "charlm", "--buffer", "2"], ["--mode async"]),
        (["--job", "charlm", "--mode", "async", "--buffer", "2", "--replicate", ".5"], ["--replicate"]),
        (
            ["--job", "charlm", "--mode", "async", "--buffer", "2", "--dp-clip", "1", "--dp-noise", "1"],
            ["--dp-clip"],
        ),
        (["--job", "charlm", "--mode", "later"], ["--mode"]),
        (["--job", "charlm", "--inner-state", "forever"], ["--inner-state"]),
        (["--job", "charlm", "--work-check", "1.5"], ["--work-check"]),
        (["--job", "charlm", "--work-check", ".1", "--inner-state", "keep"], ["--work-check", "reset"]),
        (["--job", "charlm", "--work-check", ".1", "--data", "volunteer"], ["--work-check", "own data"]),
        (["--job", "charlm", "--work-check", ".1", "--mode", "async", "--buffer", "2"], ["--work-check"]),
        (["--job", "charlm", "--work-check", ".1", "--dp-clip", "1", "--dp-noise", "1"], ["--work-check"]),
        (["--job", "charlm", "--work-check", ".1", "--slices", "2"], ["--work-check", "--slices 1"]),
        (["--job", "charlm", "--downlink-compression", "zstd"], ["zstd"]),
        (["--job", "gpt", "--job-arg", "preset=huge"], ["preset", "nano"]),
    ],
)
def test_init_refuses_bad_input_before_writing_anything(tmp_path, redis_server, in_process, flags, words):
    result = in_process("init", "--run", "r1", *flags)
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
        ["abort-round", "--run", "ghost"],
        ["sample", "--run", "ghost", "--prompt", "hello"],
    ],
)
def test_unknown_run_is_one_line_naming_the_run(in_process, command):
    result = in_process(*command)
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


def test_every_command_has_help(tmp_path, in_process):
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
        "abort-round",
        "sample",
    ]:
        result = in_process(command, "--help")
        assert result.returncode == 0 and "usage: coordinator " + command in result.stdout
    # and through the real entry point, once
    result = _coordinator(tmp_path, "init", "--help")
    assert result.returncode == 0 and "usage: coordinator init" in result.stdout
    # the spec grammar's size policy, and the default that uses it
    text = " ".join(result.stdout.split())
    assert "size policy @N[:SMALL]" in text and "default topk:0.01+int2@4096" in text


def _volunteer(tmp_path, *argv, broker=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CROWDTRAIN_HOME": str(tmp_path / "home")}
    if broker:
        env["CROWDTRAIN_BROKER_URL"] = broker
    return subprocess.run(
        [sys.executable, "-m", "cli.volunteer", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--shards", "0"], ["--shards", "1 to 10000"]),
        (["--shards", "10001"], ["--shards"]),
        (["--shards", "many"], ["--shards", "whole number"]),
        (["--local-steps", "0"], ["--local-steps"]),
        (["--local-steps", "1000001"], ["--local-steps"]),
        (["--deadline", "0"], ["--deadline"]),
        (["--deadline", "604801"], ["--deadline", "604800"]),
        (["--deadline", "nan"], ["--deadline", "finite"]),
        (["--deadline", "inf"], ["--deadline", "finite"]),
        (["--lr", "0"], ["--lr"]),
        (["--lr", "11"], ["--lr", "<= 10"]),
        (["--lr", "nan"], ["--lr", "finite"]),
        (["--lr=-inf"], ["--lr", "finite"]),
        (["--server-lr", "-1"], ["--server-lr"]),
        (["--server-lr", "101"], ["--server-lr", "<= 100"]),
        (["--momentum", "1"], ["--momentum", "< 1"]),
        (["--momentum", "-0.1"], ["--momentum", ">= 0"]),
        (["--momentum", "nan"], ["--momentum", "finite"]),
        (["--clip-norm", "0"], ["--clip-norm", "> 0"]),
        (["--clip-norm", "inf"], ["--clip-norm", "finite"]),
        (["--max-norm-ratio", "0"], ["--max-norm-ratio", "> 0"]),
        (["--max-norm-ratio", "1e7"], ["--max-norm-ratio", "1e+06"]),
        (["--max-norm-ratio", "nan"], ["--max-norm-ratio", "finite"]),
        (["--seed", "-1"], ["--seed"]),
        (["--seed", str(2**70)], ["--seed"]),
    ],
)
def test_init_refuses_out_of_range_numbers_naming_the_flag(in_process, redis_server, tmp_path, flags, words):
    result = in_process("init", "--run", "r1", "--job", "charlm", *flags)
    _assert_one_clear_line(result, *words)
    assert redis_server.client().keys("ct:*") == []
    assert not (tmp_path / "home" / "runs").exists()


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (["post-round", "--run", "r1", "--shards", str(10**11)], ["--shards", "1 to 10000"]),
        (["post-round", "--run", "r1", "--deadline", "-5"], ["--deadline"]),
        (["post-round", "--run", "r1", "--deadline", "1e9"], ["--deadline"]),
        (["run", "--run", "r1", "--rounds", "0"], ["--rounds", "1 to 100000"]),
        (["run", "--run", "r1", "--rounds", "100001"], ["--rounds"]),
        (["run", "--run", "r1", "--rounds", "2", "--shards", "0"], ["--shards"]),
        (["quickstart", "--volunteers", "0"], ["--volunteers", "1 to 64"]),
        (["quickstart", "--volunteers", "65"], ["--volunteers", "1 to 64"]),
        (["quickstart", "--rounds", "0"], ["--rounds"]),
        (["quickstart", "--shards", "10001"], ["--shards"]),
        (["quickstart", "--local-steps", "-3"], ["--local-steps"]),
        (["export", "--run", "r1", "--version", "-1", "--out", "x.safetensors"], ["--version"]),
        (["monitor", "--port", "-5"], ["--port", "1 to 65535"]),
        (["monitor", "--port", "0"], ["--port", "1 to 65535"]),
        (["monitor", "--port", "65536"], ["--port", "1 to 65535"]),
        (["monitor", "--address", "bad host!"], ["--address", "bad host!"]),
        (["monitor", "--basic-auth", "ops:secret"], ["--basic-auth"]),
        (["aggregator", "--metrics-port", "99999"], ["--metrics-port", "1 to 65535"]),
        (["aggregator", "--metrics-port", "0"], ["--metrics-port"]),
        (["aggregator", "--metrics-address", "::not-an-address"], ["--metrics-address"]),
        (["abort-round"], ["--run"]),
        (["no-such-command"], ["no-such-command"]),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(in_process, redis_server, command, words):
    result = in_process(*command)
    _assert_one_clear_line(result, *words)
    assert redis_server.client().keys("ct:*") == []


def test_a_model_too_large_to_allocate_is_a_usage_error_and_nothing_is_written(tmp_path, redis_server):
    flags = ["--job-arg", "width=100000000", "--job-arg", "max_files=2"]
    result = _coordinator(
        tmp_path, "init", "--run", "huge", "--job", "charlm", *flags, broker=redis_server.url
    )
    _assert_one_clear_line(result, "too large for this machine", "--job-arg")
    assert redis_server.client().keys("ct:*") == []
    assert not (tmp_path / "home" / "runs").exists()


def test_export_to_an_unwritable_path_is_one_line_and_writes_nothing(tmp_path, in_process):
    created = in_process("init", "--run", "r1", "--job", "charlm", *TINY_CHARLM)
    assert created.returncode == 0, created.stderr
    for out in ("/proc/x", "/proc/x/model.safetensors", str(tmp_path)):
        result = in_process("export", "--run", "r1", "--out", out)
        _assert_one_clear_line(result, "--out", out)
    assert not (tmp_path / "home" / "r1.safetensors").exists()


def test_abort_round_without_a_round_in_progress_is_a_usage_error(in_process):
    created = in_process("init", "--run", "r1", "--job", "charlm", *TINY_CHARLM)
    assert created.returncode == 0, created.stderr
    result = in_process("abort-round", "--run", "r1")
    _assert_one_clear_line(result, "r1", "no round in progress")
    result = in_process("abort-round", "--run", "ghost", "--json")
    _assert_one_clear_line(result, "ghost")


@pytest.mark.parametrize(
    "command", [["monitor", "--port", "{port}"], ["aggregator", "--metrics-port", "{port}"]]
)
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, redis_server, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = _coordinator(
            tmp_path, *(part.format(port=port) for part in command), broker=redis_server.url
        )
    _assert_one_clear_line(result, port, "cannot listen")


@pytest.mark.parametrize(
    "command",
    [
        ["monitor", "--address", "192.0.2.1"],
        ["aggregator", "--metrics-port", "9", "--metrics-address", "192.0.2.1"],
    ],
)
def test_an_address_not_of_this_host_is_one_line_and_exit_2(tmp_path, redis_server, command):
    result = _coordinator(tmp_path, *command, broker=redis_server.url)
    _assert_one_clear_line(result, "192.0.2.1", "cannot listen")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["start", "--concurrency", "0"], ["--concurrency"]),
        (["start", "--threads", "-1"], ["--threads"]),
        (["start", "--broker-file", "{missing}"], ["--broker-file", "cannot read"]),
        (["start", "--broker-file", "{empty}"], ["--broker-file", "empty"]),
        (["start", "--broker-file", "{folder}"], ["--broker-file"]),
        (["start", "--broker-file", "{empty}", "--broker", "redis://127.0.0.1:1/0"], ["--broker"]),
        (["start", "--pool", "gevent"], ["--pool"]),
        (["start", "--data", "{missing}"], ["--data", "no readable file"]),
    ],
)
def test_volunteer_start_refuses_bad_input_in_one_line(tmp_path, argv, words):
    empty = tmp_path / "empty.url"
    empty.write_text("\n  \n")
    paths = {"missing": tmp_path / "missing.url", "empty": empty, "folder": tmp_path}
    result = _volunteer(tmp_path, *(part.format(**paths) for part in argv))
    _assert_one_clear_line(result, *words)


def test_a_parquet_corpus_without_the_text_field_is_one_line_and_nothing_is_written(
    tmp_path, redis_server, in_process
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text " * 50] * 20}), tmp_path / "docs.parquet")
    result = in_process("init", "--run", "g", "--job", "gpt", "--job-arg", f"corpus={tmp_path}/*.parquet")
    _assert_one_clear_line(result, "no column 'text'", "body", "text_field=NAME")
    assert redis_server.client().keys("ct:*") == []
    assert not (tmp_path / "home" / "runs").exists()


def test_sample_of_a_job_that_writes_no_text_is_one_line(in_process):
    assert in_process("init", "--run", "t", "--job", "tests.fixtures.jobs_tiny:make_job").returncode == 0
    _assert_one_clear_line(in_process("sample", "--run", "t", "--prompt", "hi"), "does not generate text")
    _assert_one_clear_line(in_process("sample", "--run", "t", "--prompt", "hi", "--tokens", "0"), "--tokens")


def test_the_inner_state_is_kept_by_default_unless_the_outer_strategy_has_momentum(in_process, redis_server):
    from coordinator.store import Store

    store = Store(redis_server.client())
    for run, flags, expected in [
        ("plain", [], "keep"),
        ("outer", ["--strategy", "diloco"], "reset"),
        ("chosen", ["--strategy", "diloco", "--inner-state", "keep"], "keep"),
    ]:
        result = in_process("init", "--run", run, "--job", "tests.fixtures.jobs_tiny:make_job", *flags)
        assert result.returncode == 0, result.stderr
        assert store.run_config(run).inner_state == expected, run
