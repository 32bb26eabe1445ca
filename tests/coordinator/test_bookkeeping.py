"""The sweep of kombu's volunteer-writable keys, on a real Redis: junk goes, the live bookkeeping stays."""

from __future__ import annotations

import json
import time

import pytest
import redis

from broker import keys
from coordinator.rounds import bookkeeping
from coordinator.rounds.bookkeeping import MAX_BINDINGS, MIN_HORIZON, PRIORITY_SEP, sweep


def _entry(queue: str = "train") -> bytes:
    message = {"body": "", "headers": {"task": "train_shard"}, "properties": {"delivery_info": {}}}
    return json.dumps([message, queue, queue]).encode()


def test_sweep_deletes_the_junk_a_volunteer_can_write_and_keeps_what_kombu_wrote(redis_server):
    r = redis_server.client()
    now = time.time()
    # what kombu and honest workers wrote
    r.hset(keys.UNACKED, "tag-live", _entry())
    r.zadd(keys.UNACKED_INDEX, {"tag-live": now})
    r.hset(keys.UNACKED, "tag-dead-worker", _entry())  # waiting to be restored by a living worker
    r.zadd(keys.UNACKED_INDEX, {"tag-dead-worker": now - 120})
    r.rpush("train", b"a message", b"another")
    r.rpush(f"train.gpu.16g{PRIORITY_SEP}9", b"a priority message")
    r.sadd("_kombu.binding.train", "train\x06\x16\x06\x16train")
    r.sadd("_kombu.binding.celery.pidbox", "\x06\x16\x06\x16bob@host.celery.pidbox")
    r.zadd("_kombu.binding_deadlines", {"train": 1})
    r.set(keys.UNACKED_MUTEX, "a-uuid")
    # what a volunteer may write besides
    r.hset(keys.UNACKED, "no-index", b"x" * 1000)
    r.hset(keys.UNACKED, "too-big", b"x" * (keys.MAX_MESSAGE_BYTES + 1))
    r.zadd(keys.UNACKED_INDEX, {"too-big": now})
    r.hset(keys.UNACKED, "far-future", _entry())
    r.zadd(keys.UNACKED_INDEX, {"far-future": now + 10**9, "no-field": now})
    r.hset(keys.UNACKED, "ancient", _entry())
    r.zadd(keys.UNACKED_INDEX, {"ancient": 0})
    r.hset(keys.UNACKED, "t" * 500, _entry())
    r.zadd(keys.UNACKED_INDEX, {"t" * 500: now})
    r.rpush("train.junk", b"x")
    r.rpush(f"train{PRIORITY_SEP}junk", b"x")
    r.rpush(f"train.gpu{PRIORITY_SEP}4", b"x")  # no such priority step
    r.rpush("train", b"y" * (keys.MAX_MESSAGE_BYTES + 1))
    r.set("train.16g", b"a string where kombu reads a list")
    r.sadd("_kombu.binding.junk", "x")
    r.sadd("_kombu.binding_permanent.junk", "x")
    r.sadd("_kombu.binding.train", "z" * 5000)
    r.sadd("_kombu.binding.celeryev", *[f"m{i}" for i in range(MAX_BINDINGS + 1)])
    r.zadd("_kombu.binding_deadlines", {"junk": 1})
    # act
    swept = sweep(r, MIN_HORIZON, now=now)
    # assert
    assert sorted(r.hkeys(keys.UNACKED)) == [b"tag-dead-worker", b"tag-live"]
    assert sorted(r.zrange(keys.UNACKED_INDEX, 0, -1)) == [b"tag-dead-worker", b"tag-live"]
    assert swept.unacked == 6
    assert r.lrange("train", 0, -1) == [b"a message", b"another"]
    assert r.llen(f"train.gpu.16g{PRIORITY_SEP}9") == 1
    left = {k for k in r.scan_iter(match="train*")} | {k for k in r.scan_iter(match="_kombu*")}
    assert left == {
        b"train",
        f"train.gpu.16g{PRIORITY_SEP}9".encode(),
        b"_kombu.binding.train",
        b"_kombu.binding.celery.pidbox",
        b"_kombu.binding_deadlines",
    }
    assert r.smembers("_kombu.binding.train") == {b"train\x06\x16\x06\x16train"}
    assert r.zrange("_kombu.binding_deadlines", 0, -1) == [b"train"]
    assert r.get(keys.UNACKED_MUTEX) == b"a-uuid"
    # a second sweep finds nothing
    assert not sweep(r, MIN_HORIZON, now=now)


def test_sweep_replaces_kombu_keys_of_the_wrong_type(redis_server):
    r = redis_server.client()
    r.set(keys.UNACKED, b"x" * 1000)
    r.rpush(keys.UNACKED_INDEX, b"x")
    r.rpush(keys.UNACKED_MUTEX, b"x")
    r.set("train", b"x")
    sweep(r)
    assert not any(r.exists(k) for k in (keys.UNACKED, keys.UNACKED_INDEX, keys.UNACKED_MUTEX, "train"))


def test_sweep_frees_a_full_redis(redis_server):
    # arrange: junk of every family, then Redis full (no eviction): every write is refused
    r = redis_server.client()
    junk = b"j" * (keys.MAX_MESSAGE_BYTES + 1)
    r.hset(keys.UNACKED, "no-index", junk)
    r.rpush("train", junk, b"a message")
    r.rpush("train.junk", junk)
    r.sadd("_kombu.binding.junk", junk)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("x", 1)
        # act
        swept = sweep(r)
    finally:
        r.config_set("maxmemory", 0)
    # assert: deletions only, which a full Redis still runs
    assert (swept.unacked, swept.keys, swept.entries) == (1, 2, 1)
    assert r.lrange("train", 0, -1) == [b"a message"] and not r.exists(keys.UNACKED)


def test_refreshed_junk_over_the_byte_cap_goes_largest_first(redis_server, monkeypatch):
    # arrange: entries of the right shape and a fresh time, as a volunteer refreshing its junk keeps
    # them, 100 KiB each; beside them honest messages of 2 KiB; the cap is 256 KiB here
    monkeypatch.setattr(bookkeeping, "MAX_UNACKED_BYTES", 256 * 1024)
    r = redis_server.client()
    now = time.time()
    padding = "p" * (100 * 1024)
    for i in range(20):
        r.hset(keys.UNACKED, f"junk-{i}", json.dumps([{"pad": padding}, "train", "train"]))
        r.zadd(keys.UNACKED_INDEX, {f"junk-{i}": now})
    honest = [f"honest-{i}".encode() for i in range(10)]
    for tag in honest:
        r.hset(keys.UNACKED, tag, _entry() + b" " * 2000)
        r.zadd(keys.UNACKED_INDEX, {tag: now})
    # act
    swept = sweep(r, now=now)
    # assert: the honest ones stay, the junk is gone, the hash is under its cap
    assert swept.unacked == 20 and sorted(r.hkeys(keys.UNACKED)) == sorted(honest)
