"""Fusion's bad input: one clear line on stderr, exit 2, nothing written to Redis or to disk."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest
import redis

from cli.coordinator import main
from tests.conftest import TINY_CHARLM, RedisServer

TINY = "tests.fixtures.jobs_tiny:make_job"


@pytest.fixture(scope="module")
def fused_world(tmp_path_factory):
    """Runs a, b (tiny charlm), wide (another width), g (gpt), t1, t2 (a regression job), ensemble e of a, b.

    Made once for the module: every command here must leave them as they are.
    """
    folder = tmp_path_factory.mktemp("fusion")
    server = RedisServer(folder / "redis").start()
    home = folder / "home"

    def run(*argv: str) -> subprocess.CompletedProcess:
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CROWDTRAIN_BROKER_URL", server.url)
            patch.setenv("CROWDTRAIN_HOME", str(home))
            patch.chdir(folder)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(argv))
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 2
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

    small = [arg.replace("width=32", "width=16") for arg in TINY_CHARLM]
    for name, text in (("prose", "the quick brown fox jumps over the lazy dog. "), ("other", "x = [1, 2]\n")):
        (folder / name).mkdir()
        for i in range(3):
            (folder / name / f"{i}.txt").write_text(text * (200 + 50 * i))
    gpt = ["--job", "gpt", "--job-arg", "layers=1", "--job-arg", "width=16", "--job-arg", "heads=2"]
    gpt += ["--job-arg", "context=16", "--job-arg", "vocab=280", "--job-arg", "corpus=prose/*.txt"]
    try:
        for argv in (
            ["--run", "g", *gpt],
            ["--run", "a", "--job", "charlm", *TINY_CHARLM],
            ["--run", "b", "--job", "charlm", *TINY_CHARLM, "--job-arg", "seed=1"],
            ["--run", "wide", "--job", "charlm", *small],
            ["--run", "t1", "--job", TINY],
            ["--run", "t2", "--job", TINY],
        ):
            assert run("init", *argv).returncode == 0
        assert run("fuse", "--runs", "a,b", "--out", "e", "--method", "ensemble").returncode == 0
        (folder / "e.safetensors").write_text("a file already")
        yield run, server.client(), home
    finally:
        server.stop()


def _state(client: redis.Redis, home: Path) -> tuple[dict, list[str]]:
    values = {key: client.dump(key) for key in sorted(client.keys("ct:*"))}
    files = sorted(os.path.relpath(os.path.join(d, f), home) for d, _, fs in os.walk(home) for f in fs)
    return values, files


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["fuse", "--runs", "a,nope", "--out", "x", "--method", "average"], ["unknown run", "nope"]),
        (["fuse", "--runs", "a,b", "--out", "b", "--method", "average"], ["--out", "'b'", "exists"]),
        (["fuse", "--runs", "a,b", "--out", "e", "--method", "ensemble"], ["--out", "'e'", "exists"]),
        (["fuse", "--runs", "a,wide", "--out", "x", "--method", "average"], ["different architectures"]),
        (["fuse", "--runs", "a", "--out", "x", "--method", "ensemble"], ["at least two runs"]),
        (["fuse", "--runs", "a,b", "--out", "x", "--method", "average", "--weights", "1,2,3"], ["3 weights"]),
        (["fuse", "--runs", "a,b", "--out", "x", "--method", "ensemble", "--weights", "1,-1"], ["negative"]),
        (["fuse", "--runs", "a,b", "--out", "x", "--method", "average", "--weights=-1,2"], ["negative"]),
        (
            ["fuse", "--runs", "a,b", "--out", "x", "--method", "average", "--weights", "posterior"],
            ["ensemble"],
        ),
        (["fuse", "--runs", "a,b:5", "--out", "x", "--method", "ensemble"], ["versions 0 to 0"]),
        (["fuse", "--runs", "t1,t2", "--out", "x", "--method", "ensemble"], ["cannot be ensembled"]),
        (["fuse", "--runs", "a,t1", "--out", "x", "--method", "ensemble"], ["one job"]),
        (["evaluate", "--run", "nope"], ["unknown run", "nope"]),
        (["evaluate", "--run", "e", "--version", "1"], ["--version is for runs"]),
        (["evaluate", "--run", "t1", "--data", "."], ["cannot evaluate a corpus"]),
        (["init", "--run", "x", "--from", "nope"], ["unknown run", "nope"]),
        (["init", "--run", "x", "--from", "a", "--job-arg", "width=16"], ["different architectures"]),
        (["init", "--run", "x", "--from", "a", "--job", TINY], ["keeps its parent's job"]),
        (["init", "--run", "x", "--from", "a:2"], ["versions 0 to 0"]),
        (["init", "--run", "x", "--from", "g", "--job-arg", "corpus=other/*.txt"], ["tokenizer"]),
        (["init", "--run", "e", "--job", "charlm"], ["'e'", "ensemble"]),
        (["init", "--run", "x"], ["--job is needed"]),
        (["export", "--run", "e", "--out", "e.safetensors"], ["ensemble", "folder"]),
    ],
)
def test_bad_fusion_input_is_one_line_exit_2_and_writes_nothing(fused_world, argv, words):
    run, client, home = fused_world
    before = _state(client, home)

    result = run(*argv)

    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert _state(client, home) == before
