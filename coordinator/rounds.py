"""Posting rounds, waiting for them, and the JSON documents that describe them."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from celery import Celery

from coordinator.store import Store
from tasks.app import TRAIN_QUEUE

POLL_SECONDS = 0.1
BROKER_OUTAGE_SECONDS = 120.0
log = logging.getLogger("crowdtrain.rounds")
ProgressFn = Callable[[dict[str, Any]], None]


class QuorumError(ValueError):
    """--quorum is neither a shard count nor a fraction in (0, 1]."""


def parse_quorum(spec: str | int | float | None, shards: int) -> int:
    """An integer is a count of shards; a number with a decimal point a fraction of them."""
    if spec is None:
        return shards
    text = str(spec).strip()
    try:
        if "." in text:
            fraction = float(text)
            if not 0 < fraction <= 1:
                raise ValueError
            return max(1, math.ceil(fraction * shards - 1e-9))
        count = int(text)
    except ValueError:
        raise QuorumError(
            f"--quorum {text!r}: use a shard count (e.g. 6) or a fraction in (0, 1] (e.g. 0.75)"
        ) from None
    if not 1 <= count <= shards:
        raise QuorumError(f"--quorum {count}: must be between 1 and the round's {shards} shards")
    return count


def post_round(store: Store, app: Celery, run: str, shards: int, quorum: int,
               deadline: float) -> dict[str, Any]:
    """Open a round on the current model version and enqueue one task per shard."""
    with _interrupts_deferred():  # Ctrl-C must not leave a round with half its shards posted
        info = store.open_round(run, shards, quorum, deadline)
        _send_shards(app, run, info, shards)
    return info


def _send_shards(app: Celery, run: str, info: dict[str, Any], shards: int) -> None:
    with app.producer_or_acquire() as producer:  # one connection for the whole round
        for shard in range(shards):
            app.send_task("train_shard", queue=TRAIN_QUEUE, producer=producer, kwargs={
                "run": run, "round": info["round"], "shard": shard, "shards": shards,
                "version": info["base_version"]})


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block is done, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def wait_round(store: Store, run: str, number: int, progress: ProgressFn | None = None,
               poll: float = POLL_SECONDS) -> dict[str, Any]:
    """Block until the round is done or failed; report its live counters meanwhile.

    A broker that goes away (a Redis restart) is waited for, up to
    BROKER_OUTAGE_SECONDS, with a log line: the round itself lives in Redis.
    """
    outage_since: float | None = None
    while True:
        try:
            info = store.round_info(run, number)
            outage_since = None
        except redis.ConnectionError as e:
            now = time.monotonic()
            if outage_since is None:
                outage_since = now
                log.warning("broker unreachable (%s); waiting for it to come back", e)
            if now - outage_since > BROKER_OUTAGE_SECONDS:
                raise
            time.sleep(1.0)
            continue
        if info is None:
            raise LookupError(f"round {number} of run {run!r} does not exist")
        if progress is not None:
            progress(info)
        if info["status"] in ("done", "failed"):
            return round_record(store, run, number)
        time.sleep(poll)


def round_record(store: Store, run: str, number: int) -> dict[str, Any]:
    """One entry of the ``rounds`` list of DESIGN.md's JSON."""
    info = store.round_info(run, number) or {}
    summary = json.loads(info["summary"]) if isinstance(info.get("summary"), str) else {}
    rejections = store.rejections(run, number)
    record = {
        "round": number,
        "status": info.get("status"),
        "model_version": summary.get("model_version", info.get("base_version")),
        "shards": info.get("shards"),
        "accepted": summary.get("accepted", info.get("accepted", 0)),
        "rejected": len(rejections),
        "late": info.get("late", 0),
        "train_loss": summary.get("train_loss"),
        "eval_loss": summary.get("eval_loss"),
        "uplink_bytes": info.get("uplink_bytes", 0),
        "downlink_bytes": info.get("downlink_bytes", 0),
        "seconds": summary.get("seconds"),
        "rejections": rejections,
    }
    if "eval_accuracy" in summary:
        record["eval_accuracy"] = summary["eval_accuracy"]
    return record


def run_document(store: Store, run: str, rounds: list[int]) -> dict[str, Any]:
    """The JSON of ``run``, ``post-round --wait`` and ``quickstart``."""
    config = store.run_config(run)
    records = [round_record(store, run, n) for n in rounds]
    evaluated = [r for r in records if r.get("eval_loss") is not None]
    initial = dict(config.get("initial") or {})
    last = evaluated[-1] if evaluated else {"eval_loss": initial.get("eval_loss")}
    final = {"model_version": store.version(run), "eval_loss": last.get("eval_loss")}
    if "eval_accuracy" in last:
        final["eval_accuracy"] = last["eval_accuracy"]
    return {"run": run, "job": config["job"], "strategy": config["strategy"],
            "compression": config["compression"], "rounds": records,
            "initial": {"model_version": 0, **initial}, "final": final}
