"""Posting a round: every shard's task once, in pipelined batches, and a clear error when Redis is full."""

from __future__ import annotations

import base64
import json

import msgpack
import redis
from kombu.exceptions import BatchPublishError

from broker import keys
from broker.run_config import RunConfig
from broker.settings import Settings
from coordinator.errors import is_broker_full
from coordinator.rounds.posting import PUBLISH_BATCH, post_round
from coordinator.store import Store
from tasks.app import make_app


def _queued_kwargs(client: redis.Redis) -> list[dict]:
    """The keyword arguments of every task on ``train``, oldest first."""
    envelopes = [json.loads(raw) for raw in reversed(client.lrange(keys.TRAIN_QUEUE, 0, -1))]
    return [msgpack.unpackb(base64.b64decode(e["body"]))[1] for e in envelopes]


def test_post_round_posts_each_shard_once_with_its_sent_event_in_batches(redis_server):
    # arrange: more shards than one pipeline holds, and a listener for Flower's task-sent events
    client = redis_server.client()
    store = Store(client)
    store.create_run("r", RunConfig(job="tiny"), b"model-v0")
    events = client.pubsub()
    events.psubscribe("/0.celeryev*")
    assert events.get_message(timeout=5)["type"] == "psubscribe"
    app = make_app(Settings(broker_url=redis_server.url))
    shards = PUBLISH_BATCH  # two commands each (the task, its event): at least two pipelines

    # act
    info = post_round(store, app, "r", shards, shards, 60.0)

    # assert
    posted = _queued_kwargs(client)
    assert [task["shard"] for task in posted] == list(range(shards))
    assert {(t["run"], t["round"], t["shards"], t["version"]) for t in posted} == {
        ("r", info["round"], shards, 0)
    }
    sent = 0
    while (message := events.get_message(timeout=2)) is not None:
        sent += json.loads(base64.b64decode(json.loads(message["data"])["body"]))["type"] == "task-sent"
    assert sent == shards


def test_an_oom_behind_kombus_batch_error_is_a_full_broker():
    refusal = redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    try:
        try:
            raise refusal
        except redis.RedisError as e:
            raise BatchPublishError("Redis publish batch failed; delivery is uncertain") from e
    except BatchPublishError as batch:
        assert is_broker_full(batch)
    assert not is_broker_full(BatchPublishError("something else"))
