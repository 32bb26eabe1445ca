"""What a volunteer may write into the queues' bookkeeping is never trusted by a worker."""

from __future__ import annotations

import json

import pytest
import redis

from broker.keys import AGGREGATE_QUEUE
from broker.routing import train_queues
from broker.settings import Settings
from tasks.aggregation import aggregator_app
from tasks.poison import OUR_QUEUES, restorable
from tasks.results import DisabledBackend, GuardedRedisBackend
from tasks.training import volunteer_app
from volunteer.worker import VolunteerOptions

MESSAGE = {"body": "", "headers": {"task": "train_shard"}, "properties": {"delivery_info": {}}}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ([MESSAGE, "train", "train"], (MESSAGE, "train")),
        ([MESSAGE, "", "train.gpu.16g"], (MESSAGE, "train.gpu.16g")),
        ([MESSAGE, "", "ct:run:r:config"], None),  # a key of the trusted side's
        ([MESSAGE, "train", "elsewhere"], None),  # a binding to another queue
        ([MESSAGE, "aggregate", "aggregate"], None),  # the trusted queue
        ([MESSAGE, "train"], None),
        (["not a message", "train", "train"], None),
        ([{**MESSAGE, "headers": []}, "train", "train"], None),
        ([{**MESSAGE, "properties": {"delivery_info": 1}}, "train", "train"], None),
    ],
)
def test_an_unacked_entry_is_restored_only_as_a_message_to_a_train_queue(entry, expected):
    assert restorable(json.dumps(entry).encode(), train_queues()) == expected


def test_junk_that_is_no_json_is_not_restored():
    assert restorable(b"\xff\xfe not json", train_queues()) is None
    assert restorable(None, train_queues()) is None
    # the trusted side's own entries may go back to the trusted queue
    assert restorable(json.dumps([MESSAGE, "aggregate", "aggregate"]).encode(), OUR_QUEUES) == (
        MESSAGE,
        AGGREGATE_QUEUE,
    )


def test_each_side_runs_only_its_own_task_and_a_volunteer_stores_no_result():
    settings = Settings(broker_url="redis://127.0.0.1:1/0")
    volunteer = volunteer_app(settings, VolunteerOptions(name="alice"))
    trusted = aggregator_app(settings)
    assert volunteer.own_tasks == {"train_shard"} and trusted.own_tasks == {"aggregate_round", "merge_slices"}
    assert "celery.map" in volunteer.tasks  # Celery's built-ins are registered, and never run
    assert isinstance(volunteer.backend, DisabledBackend)
    assert isinstance(trusted.backend, GuardedRedisBackend)
    unacked = {k: v for k, v in trusted.conf.broker_transport_options.items() if k.startswith("unacked_")}
    assert unacked["unacked_key"].startswith("ct:trusted:")  # out of every volunteer's reach
    assert volunteer.conf.broker_transport_options["unacked_key"] == "unacked"


def test_a_result_a_full_redis_refuses_is_logged_not_raised(redis_server, caplog):
    app = aggregator_app(Settings(broker_url=redis_server.url))
    client = redis_server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("x", 1)
        app.backend.store_result("some-task", {"ok": 1}, "SUCCESS")  # does not raise
    finally:
        client.config_set("maxmemory", 0)
    assert "Redis refused it" in caplog.text and not client.exists("celery-task-meta-some-task")


def test_our_queues_route_by_name_whatever_the_binding_sets_hold(redis_server):
    """A guard: Celery posts shards through the default exchange, which reads no binding, but a
    restore or a publish through a queue's own exchange would read the set a volunteer may write."""
    # arrange: a volunteer added bindings that would copy every shard to a queue (or key) of its choosing
    client = redis_server.client()
    client.sadd("_kombu.binding.train", "train\x06\x16\x06\x16train", "train\x06\x16\x06\x16ct:evil")
    client.sadd("_kombu.binding.train", "train\x06\x16\x06\x16aggregate")
    app = aggregator_app(Settings(broker_url=redis_server.url))
    # act: the trusted side posts a shard
    app.send_task("train_shard", kwargs={"run": "r"}, queue="train", ignore_result=True)
    # assert
    assert client.llen("train") == 1
    assert not client.exists("ct:evil") and not client.exists("aggregate")
