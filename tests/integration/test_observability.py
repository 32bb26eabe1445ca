"""What operators watch besides Flower: /metrics, `coordinator status`, the report."""

from __future__ import annotations

import io
import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from broker.settings import Settings
from coordinator.store import Store
from coordinator.views.metrics import CrowdtrainCollector, OnlineVolunteers
from coordinator.views.status import print_status
from tasks.app import make_app
from tests.conftest import TINY_CHARLM, free_port, wait_until


def test_after_a_round_metrics_and_status_show_queues_counters_bytes_loss_and_volunteers(
    processes, redis_server
):
    # arrange: an aggregator serving /metrics, alice and bob, one finished round of run 'demo'
    port = free_port()
    processes.aggregator("aggregator", "--metrics-port", str(port))
    processes.volunteer("alice")
    processes.volunteer("bob")
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
    record = processes.json("post-round", "--run", "demo", "--wait")["rounds"][0]

    # act
    samples = _scrape(port, processes)
    status = processes.cli("status")

    # assert: /metrics
    assert samples[("crowdtrain_queue_depth", ("train",))] == 0
    assert samples[("crowdtrain_queue_depth", ("aggregate",))] == 0
    run = ("demo",)
    assert samples[("crowdtrain_model_version", run)] == 1
    assert samples[("crowdtrain_round", run)] == 1
    assert samples[("crowdtrain_round_open", run)] == 0
    assert samples[("crowdtrain_round_shards", run)] == 2
    assert samples[("crowdtrain_round_quorum", run)] == 2
    assert samples[("crowdtrain_round_accepted", run)] == 2
    assert samples[("crowdtrain_round_rejected", run)] == 0
    assert samples[("crowdtrain_round_late", run)] == 0
    assert samples[("crowdtrain_round_uplink_bytes", run)] == record["uplink_bytes"] > 0
    # version 0 is built on each volunteer from the job's seed: nothing fetched in round 1
    assert samples[("crowdtrain_round_downlink_bytes", run)] == record["downlink_bytes"] == 0
    assert samples[("crowdtrain_uplink_bytes_total", run)] == record["uplink_bytes"]
    assert samples[("crowdtrain_eval_loss", run)] == pytest.approx(record["eval_loss"])
    assert samples[("crowdtrain_eval_accuracy", run)] == pytest.approx(record["eval_accuracy"])
    assert samples[("crowdtrain_train_loss", run)] == pytest.approx(record["train_loss"])
    assert samples[("crowdtrain_volunteers_known", ())] == 2
    # the norm gauge is there exactly when the aggregator recorded one (no made-up 0)
    summary = json.loads(redis_server.client().hget("ct:run:demo:round:1", "summary"))
    assert samples.get(("crowdtrain_round_mean_delta_norm", run)) == summary.get("mean_delta_norm")

    # assert: `coordinator status`, the human form
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "demo" in out and "charlm" in out and "fedavg" in out
    assert "queues: train 0 waiting, aggregate 0 waiting" in out
    assert "volunteers (2 of 2 online)" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.strip().startswith(("alice", "bob"))
    }
    assert set(rows) == {"alice", "bob"}
    assert all(row[1] == "cpu" and row[2] == "yes" for row in rows.values()), rows
    assert sum(int(row[5]) for row in rows.values()) == 2  # the 'accepted' credit column
    assert "{" not in out  # a human table, not JSON

    # assert: a recorded mean delta norm shows up, and who answers a ping is 'online'
    store = Store(redis_server.client())
    store.redis.hset("ct:run:demo:round:1", "summary", json.dumps({**summary, "mean_delta_norm": 0.25}))
    online = OnlineVolunteers(make_app(Settings(broker_url=redis_server.url)))
    online.refresh()
    samples = _samples(CrowdtrainCollector(store, online).collect())
    assert samples[("crowdtrain_round_mean_delta_norm", run)] == 0.25
    assert samples[("crowdtrain_volunteers_online", ())] == 2  # the aggregator is no volunteer
    assert {"alice", "bob", "aggregator"} <= online()


def test_status_shows_an_open_rounds_progress_and_offline_volunteers():
    # arrange
    document = {
        "runs": [
            {
                "run": "big",
                "job": "charlm",
                "strategy": "diloco",
                "compression": "int8",
                "model_version": 3,
                "rounds": 4,
                "open_round": {
                    "round": 4,
                    "shards": 8,
                    "quorum": 6,
                    "accepted": 2,
                    "rejected": 1,
                    "late": 0,
                    "status": "open",
                },
            }
        ],
        "queues": {"train": 5, "aggregate": 0},
        "volunteers": [
            {
                "name": "carol",
                "device": "cuda:0",
                "online": False,
                "shards_done": 12,
                "samples": 3072,
                "accepted": 11,
                "rejected": 1,
                "samples_per_second": 812.5,
                "reputation": 0.84,
            }
        ],
    }
    stream = io.StringIO()
    # act
    print_status(document, Console(file=stream, width=120))
    # assert
    out = stream.getvalue()
    assert "round 4: 2/8 accepted (quorum 6), 1 rejected, open" in out
    assert "queues: train 5 waiting, aggregate 0 waiting" in out
    assert "volunteers (0 of 1 online)" in out
    assert "carol" in out and "cuda:0" in out and "3072" in out and " no " in out and "812.5" in out
    assert "reputation" in out and "0.84" in out


def test_status_without_runs_or_volunteers_says_how_to_start():
    stream = io.StringIO()
    print_status(
        {"runs": [], "queues": {"train": 0, "aggregate": 0}, "volunteers": []},
        Console(file=stream, width=120),
    )
    out = stream.getvalue()
    assert "coordinator init" in out and "volunteer start" in out


def _scrape(port: int, processes, timeout: float = 30.0) -> dict[tuple[str, tuple], float]:
    """GET /metrics (retrying while the aggregator starts) and index its samples."""

    def text() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return response.read().decode()
        except OSError:
            return None

    page = wait_until(text, "/metrics on the aggregator", timeout, processes, poll=0.5)
    return _samples(text_string_to_metric_families(page))


def _samples(families) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(s.labels.values())): s.value for family in families for s in family.samples}
