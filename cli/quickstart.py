"""``coordinator quickstart``: the whole system on one machine, then tidy up.

Starts (or reuses) the embedded Redis, one aggregator and N volunteer
processes, runs the job for R rounds, writes the report plot, and stops
everything it started — also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker import embedded
from broker.settings import Settings
from cli import commands
from coordinator.merging.strategies import make_strategy
from jobs import load_job, parse_job_args
from serialization import parse_codec

STOP_TIMEOUT = 20.0
QUICKSTART_DEADLINE = 300.0


def quickstart(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the flags, start the processes, run the rounds, clean up."""
    job_args = parse_job_args(args.job_arg)
    parse_codec(args.compression)
    make_strategy(args.strategy)
    load_job(args.job, job_args)
    settings = Settings.from_env(broker_url=args.broker)
    server = None
    if settings.broker_url is None:
        server = embedded.ensure_running(settings.home)
        settings = settings.with_broker(server.url)
    processes: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        processes.extend(_start_workers(settings, args.volunteers))
        conn_args = argparse.Namespace(broker=settings.broker_url)
        # a name neither Redis nor the disk has: a second quickstart never meets the first's folder
        taken = commands.connect(conn_args).store.runs() + _folders(settings.home)
        run_name = _fresh_run_name(taken)
        commands.init(
            argparse.Namespace(
                broker=settings.broker_url,
                run=run_name,
                job=args.job,
                job_arg=args.job_arg,
                strategy=args.strategy,
                compression=args.compression,
                local_steps=args.local_steps,
                shards=args.shards or 2 * args.volunteers,
                quorum=None,
                deadline=QUICKSTART_DEADLINE,
                json=args.json,
            )
        )
        document = commands.run(
            argparse.Namespace(
                broker=settings.broker_url,
                run=run_name,
                rounds=args.rounds,
                shards=None,
                quorum=None,
                deadline=None,
                json=args.json,
            )
        )
        from coordinator.views.report import plot_run  # matplotlib: only quickstart's end pays for it

        report = plot_run(document, settings.home / "runs" / run_name / "report.png")
        document["report"] = str(report)
        if not args.json:
            print(f"report: {report}")
        return document
    finally:
        _stop_all(processes)
        if server is not None and server.started:
            embedded.stop(server)
        signal.signal(signal.SIGTERM, previous)


def _start_workers(settings: Settings, volunteers: int) -> list[subprocess.Popen]:
    logs = settings.home / "quickstart"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CROWDTRAIN_BROKER_URL": settings.broker_url or "",
        "CROWDTRAIN_HOME": str(settings.home),
        "CROWDTRAIN_TORCH_THREADS": "1",
    }
    commands_to_run = [
        [
            sys.executable,
            "-m",
            "cli.coordinator",
            "aggregator",
            "--name",
            f"quickstart-aggregator-{os.getpid()}",
        ]
    ]
    for i in range(volunteers):
        commands_to_run.append(
            [
                sys.executable,
                "-m",
                "cli.volunteer",
                "start",
                "--device",
                "cpu",
                "--name",
                f"quickstart-volunteer-{i + 1}",
            ]
        )
    processes = []
    for command in commands_to_run:
        log = open(logs / f"{command[-1]}.log", "ab")
        processes.append(
            subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        log.close()
    return processes


def _stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM (Celery's warm shutdown) to each process group, SIGKILL stragglers."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _folders(home: Path) -> list[str]:
    """Names under ``home/runs``: a run Redis lost keeps its folder, which ``init`` will not reuse."""
    runs = home / "runs"
    return [path.name for path in runs.iterdir()] if runs.is_dir() else []


def _fresh_run_name(existing: list[str]) -> str:
    names = set(existing)
    if "quickstart" not in names:
        return "quickstart"
    n = 2
    while f"quickstart-{n}" in names:
        n += 1
    return f"quickstart-{n}"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
