"""Flower, Celery's web monitor, in a real headless Chromium against a real round."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import TINY_CHARLM, free_port, require_tool, wait_until

TASK_NAMES = {"train_shard", "aggregate_round"}
# Set to a folder (e.g. docs/img) to keep the screenshots that the docs show.
SCREENSHOT_DIR = os.environ.get("CROWDTRAIN_SCREENSHOT_DIR")
MAX_ARGS_CHARS = 300  # args, kwargs and results are ids and scalars, never blobs
# Flower's tasks page shows only name/uuid/state/times by default; operators add these columns.
BYTES_REPR = re.compile(r"(?<!\w)b'|\\x[0-9a-f]{2}")  # a bytes literal in a repr
TASKS_COLUMNS = "name,state,args,kwargs,result,runtime,worker"


def test_flower_shows_both_volunteers_and_a_finished_rounds_small_tasks(processes, tmp_path):
    # arrange: an aggregator, two volunteers, and Flower started by `coordinator monitor`
    chromium = require_tool("chromium", "the Flower test drives a headless Chromium")
    processes.aggregator()
    processes.volunteer("alice")
    processes.volunteer("bob")
    port = free_port()
    processes.spawn(
        "monitor",
        "-m",
        "cli.coordinator",
        "monitor",
        "--port",
        str(port),
        FLOWER_UNAUTHENTICATED_API="true",
        FLOWER_TASKS_COLUMNS=TASKS_COLUMNS,
    )
    base = f"http://127.0.0.1:{port}"
    # Flower sees only the task events sent after it connected: wait for the heartbeats first.
    wait_until(
        lambda: {"alice", "bob", "aggregator"} <= _worker_names(base),
        "Flower to see alice, bob and the aggregator",
        60,
        processes,
        poll=0.5,
    )
    processes.json(
        "init",
        "--run",
        "demo",
        "--job",
        "charlm",
        *TINY_CHARLM,
        "--local-steps",
        "5",
        "--shards",
        "2",
        "--deadline",
        "120",
    )

    # act
    document = processes.json("post-round", "--run", "demo", "--wait")
    tasks = wait_until(
        lambda: _finished_tasks(base), "Flower to record the round's tasks", 30, processes, poll=0.5
    )
    train_id = next(uuid for uuid, t in tasks.items() if t["name"] == "train_shard")
    workers_dom, tasks_dom, task_dom = (
        _render(chromium, tmp_path, f"{base}/{page}", f"flower-{name}.png")
        for page, name in (("workers", "workers"), ("tasks", "tasks"), (f"task/{train_id}", "task"))
    )

    # assert: the round itself
    assert document["rounds"][0]["accepted"] == 2, processes.log_tail()
    # the workers page, rendered by the browser, lists the volunteers
    assert "alice@" in workers_dom and "bob@" in workers_dom, workers_dom[-2000:]
    # the tasks page lists each kind of the round's tasks, with the run's name in their args
    for name in TASK_NAMES:
        assert name in tasks_dom, f"{name} missing from the tasks page"
    assert "'run': 'demo'" in tasks_dom and "'loss':" in tasks_dom, tasks_dom[-3000:]
    # a train_shard's own page (Flower's default view of arguments) reads as plain values
    assert "'run': 'demo'" in task_dom and "'shard':" in task_dom and "samples" in task_dom
    # Flower's own record of them: the right counts, all succeeded, small readable arguments
    names = sorted(t["name"] for t in tasks.values())
    assert names == ["aggregate_round", "train_shard", "train_shard"], names
    assert all(t["state"] == "SUCCESS" for t in tasks.values()), tasks
    for task in tasks.values():
        for field in ("args", "kwargs", "result"):
            text = str(task.get(field) or "")
            assert len(text) < MAX_ARGS_CHARS and not BYTES_REPR.search(text), (field, text)
    trains = [t for t in tasks.values() if t["name"] == "train_shard"]
    assert all("'run': 'demo'" in t["kwargs"] and "'shard':" in t["kwargs"] for t in trains)
    assert all("'loss':" in t["result"] and "'samples':" in t["result"] for t in trains), trains
    for name in ("workers", "tasks", "task"):
        shot = (tmp_path / f"flower-{name}.png").read_bytes()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000, name


def test_celery_a_tasks_flower_works_without_the_coordinator_command(processes):
    # arrange
    processes.volunteer("carol")
    port = free_port()
    # act: the plain Celery command line, with only the broker in the environment
    processes.spawn(
        "flower", "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"
    )
    # assert
    wait_until(
        lambda: "carol" in _worker_names(f"http://127.0.0.1:{port}"),
        "`celery -A tasks flower` to list carol",
        60,
        processes,
        poll=0.5,
    )


def _worker_names(base: str) -> set[str]:
    """Names (before '@') of the workers Flower's workers page knows to be alive."""
    document = _get_json(f"{base}/workers?json=1")
    if document is None:
        return set()
    return {w["hostname"].split("@", 1)[0] for w in document["data"] if w.get("status")}


def _finished_tasks(base: str) -> dict[str, dict[str, Any]] | None:
    """Flower's tasks once the round's three (2 train, 1 aggregate) have ended."""
    tasks = _get_json(f"{base}/api/tasks") or {}
    done = [t for t in tasks.values() if t.get("state") in ("SUCCESS", "FAILURE")]
    return tasks if len(done) >= 3 and {t["name"] for t in done} >= TASK_NAMES else None


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _render(binary: str, tmp_path: Path, url: str, screenshot: str) -> str:
    """Load ``url`` in headless Chromium, let its scripts run; screenshot it, return its DOM."""
    out = tmp_path / screenshot
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=5000",
        "--window-size=1600,900",
        f"--screenshot={out}",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and out.exists(), result.stderr[-2000:]
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, Path(SCREENSHOT_DIR) / screenshot)
    return result.stdout
