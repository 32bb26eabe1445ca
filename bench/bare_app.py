"""Bare Celery: the baseline of ``bench/round_overhead.py``.

One task, ``bare_shard``, does a shard's I/O and nothing else: read a blob from Redis,
write one of the given size back, return a small map. The app uses the delivery settings
crowdtrain's own app uses (msgpack, ``acks_late``, prefetch 1, Redis result backend), so the
comparison isolates what crowdtrain adds per shard. Started as::

    BENCH_BROKER_URL=redis://... celery -A bench.bare_app worker -Q bare -P prefork -c 2
"""

from __future__ import annotations

import os

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bare"

app = Celery("bare", broker=BROKER, backend=BROKER)
app.conf.update(
    accept_content=["application/x-msgpack"],
    result_accept_content=["application/x-msgpack"],
    task_serializer="msgpack",
    result_serializer="msgpack",
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_client: redis.Redis | None = None


@app.task(name="bare_shard")
def bare_shard(key_in: str, key_out: str, size: int) -> dict:
    """Read ``key_in`` (the 'model'), write ``size`` bytes to ``key_out`` (the 'delta')."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(BROKER)
    blob = _client.get(key_in) or b""
    _client.set(key_out, os.urandom(size), ex=3600)
    return {"key": key_out, "read": len(blob), "wrote": size}
