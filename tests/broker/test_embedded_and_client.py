"""The shared broker layer: one embedded server per home, clients that wait out a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import redis
from redis.backoff import ExponentialBackoff

from broker import embedded
from broker.client import redis_client, retries_for
from broker.settings import Settings
from tests.conftest import ROOT

START_ONE = (
    "import json, sys, pathlib\n"
    "from broker import embedded\n"
    "server = embedded.ensure_running(pathlib.Path(sys.argv[1]))\n"
    "print(json.dumps({'pid': server.pid, 'url': server.url, 'started': server.started}))\n"
)


def test_two_commands_started_at_once_share_one_embedded_server(tmp_path):
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", START_ONE, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in starters]
    try:
        assert len({r["pid"] for r in results}) == 1, results
        assert sum(r["started"] for r in results) == 1, results
    finally:
        first = results[0]
        embedded.stop(embedded.EmbeddedRedis(first["url"], first["pid"], 0, started=True))


def test_a_client_waits_out_a_redis_restart(redis_server, monkeypatch):
    settings = Settings(broker_url=redis_server.url)
    client = redis_client(settings)
    client.set("survives", b"yes")
    redis_server.stop()  # SIGTERM: the append-only file keeps the key
    impatient = redis_client(settings, patience=0)
    with pytest.raises(redis.ConnectionError):
        impatient.get("survives")
    # Restart the server only once the patient client has failed and is backing off.
    backing_off = threading.Event()
    compute = ExponentialBackoff.compute
    monkeypatch.setattr(
        ExponentialBackoff, "compute", lambda self, failures: (backing_off.set(), compute(self, failures))[1]
    )
    restarter = threading.Thread(target=lambda: backing_off.wait(60) and redis_server.start())
    restarter.start()
    try:
        assert client.get("survives") == b"yes"
        assert backing_off.is_set()
    finally:
        restarter.join()


def test_patience_turns_into_enough_backoff_steps():
    assert retries_for(0) == 0
    assert 10 < retries_for(120) < 200
