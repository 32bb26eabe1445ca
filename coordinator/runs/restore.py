"""Runs rebuilt from disk: ``coordinator restore`` and the aggregator's look for lost runs.

Redis is where a run lives while it trains; ``CROWDTRAIN_HOME/runs/NAME/`` is
its complete record (``coordinator.runs.checkpoints``, ``coordinator.runs.ledger``).
When Redis lost a run (a ``FLUSHALL``, a lost volume, a fresh container), the
run is rebuilt from that record: its config, the latest versions (the current
one bit for bit, as wire bytes in the saved order), the strategy state and the
downlink residual after it, the norm screen's history and the DP clip, the
volunteers' credit and reputation, and the round counter. A round that was
open when Redis lost it is posted again under the same number.

A run is *lost* when its folder is on disk (the name version 0 was saved
under is the folder's: a folder moved aside by ``init --force`` is not) and
Redis does not know it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import redis
from celery import Celery

from broker import keys
from broker.errors import UnknownRun
from broker.run_config import RunConfig
from coordinator.errors import RunExists, UsageError
from coordinator.rounds.asynchronous import open_buffer
from coordinator.rounds.posting import post_round
from coordinator.runs import checkpoints, ledger
from coordinator.store import Store
from coordinator.views.documents import document_of
from serialization import dumps

log = logging.getLogger("crowdtrain.restore")

# Seconds between the aggregator's looks for runs on disk that Redis lost.
WATCH_SECONDS = 5.0


def runs_on_disk(home: Path) -> list[str]:
    """Names of the run folders under ``home/runs`` (folders moved aside are not runs)."""
    folder = home / "runs"
    if not folder.is_dir():
        return []
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_dir() and keys.NAME.fullmatch(path.name) and checkpoints.recorded_name(path) == path.name
    )


def is_lost(store: Store, home: Path, run: str) -> bool:
    """True when ``run`` is on disk and Redis does not know it."""
    folder = checkpoints.run_dir(home, run)
    return checkpoints.recorded_name(folder) == run and not _known(store, run) and run not in store.runs()


def lost_runs(store: Store, home: Path) -> list[str]:
    """Runs on disk that Redis does not know."""
    known = set(store.runs())
    return [run for run in runs_on_disk(home) if run not in known and not _known(store, run)]


def restore_run(store: Store, home: Path, run: str, app: Celery | None, keep: int) -> dict[str, Any]:
    """Rebuild ``run`` in Redis from its folder; the document ``restore --json`` prints for it.

    Writes the blobs first and everything that makes the run known in one
    transaction last, so a restore cut short can be run again; a run Redis
    knows is refused (RunExists), also one another restore finished meanwhile.
    """
    if run in store.runs() or _known(store, run):
        raise RunExists(f"run {run!r} is in Redis already: nothing to restore")
    config, current = _on_disk(home, run)
    store.redis.set(keys.run_config(run), msgpack.packb(config.stored()))
    kept = [v for v in checkpoints.versions(home, run) if v > current - keep]
    for version in kept:
        weights = checkpoints.load_version(home, run, version)
        store.restore_blob(run, keys.model(run, version), dumps(weights, {"run": run, "version": version}))
    strategy = checkpoints.load_extra(home, run, "strategy", current)
    if strategy:
        store.restore_blob(run, keys.strategy(run), dumps(strategy), readable=False)
    residual = checkpoints.load_extra(home, run, "downlink", current)
    if residual:
        blob = dumps(residual, {"downlink_residual": True})
        store.restore_blob(run, keys.downlink_residual(run), blob, readable=False)
    rounds = ledger.rounds_of(home, run)
    merged = [int(r["round"]) for r in checkpoints.read_metrics(home, run) if isinstance(r.get("round"), int)]
    last = max([*rounds, *merged], default=0)  # metrics too: a run recorded before rounds.jsonl was
    reopen = rounds[last] if rounds.get(last, {}).get("status") == "open" else None
    others = [name for name in runs_on_disk(home) if name != run]
    credit = ledger.credit_of(home, [run], forfeits_from=others)  # a forfeit anywhere clears it
    reputations = ledger.credit_of(home, runs_on_disk(home))  # the latest, whichever run judged it
    state = checkpoints.load_state(home, run, current)

    def apply(pipe: redis.client.Pipeline) -> None:
        if pipe.exists(keys.run_version(run)) or pipe.sismember(keys.runs(), run):
            raise RunExists(f"run {run!r} was restored meanwhile by another process")
        pipe.multi()
        pipe.set(keys.run_rounds(run), last - 1 if reopen else last)
        _queue_state(pipe, run, state)
        _queue_credit(pipe, credit, reputations)
        pipe.set(keys.run_version(run), current)
        pipe.sadd(keys.runs(), run)

    store.redis.transaction(apply, keys.run_version(run), keys.runs())
    log.warning(
        "restored run %s from %s: version %d, round %d", run, checkpoints.run_dir(home, run), current, last
    )
    reposted = _repost(store, home, run, config, reopen, app) if reopen or config.is_async else None
    return {
        "run": run,
        "model_version": current,
        "rounds": last,
        "versions_in_redis": kept,
        "volunteers": len(credit),
        "reposted_round": reposted,
    }


def run_record(home: Path, run: str) -> tuple[RunConfig, int]:
    """A run Redis does not know, as its disk has it: (config, current version); UnknownRun if absent."""
    return _on_disk(home, run, UnknownRun)


def disk_document(home: Path, run: str) -> dict[str, Any]:
    """The ``run --json`` document of a run from its disk record alone (``report`` of a lost run)."""
    config, current = run_record(home, run)
    records = [
        _record(r) for _, r in sorted(ledger.rounds_of(home, run).items()) if r.get("status") in ledger.ENDED
    ]
    return document_of(run, config, records, current)


def fill_expired(document: dict[str, Any], home: Path, run: str) -> dict[str, Any]:
    """Rounds whose bookkeeping left Redis (``ROUND_TTL``) take their record from disk."""
    on_disk = ledger.rounds_of(home, run)
    document["rounds"] = [
        _record(on_disk[r["round"]])
        if r.get("status") is None and on_disk.get(r["round"], {}).get("status") in ledger.ENDED
        else r
        for r in document["rounds"]
    ]
    return document


def watch(
    store: Store, home: Path, stop: threading.Event, app: Celery | None, restore: bool, keep: int
) -> None:
    """The aggregator's thread: say (once per run) which runs on disk Redis lost; restore them if asked."""
    told: set[str] = set()
    while True:
        try:
            lost = lost_runs(store, home)
        except Exception as e:  # Redis away: look again later
            log.warning("could not look for lost runs: %s", e)
            lost = []
        told &= set(lost)  # a run restored and lost again is told again
        for run in (run for run in lost if run not in told):
            told.add(run)
            if not restore:
                log.warning(
                    "run %s is on disk under %s but Redis does not know it (its data was lost?): "
                    "restore it with 'coordinator restore --run %s' (or start the aggregator with --restore)",
                    run,
                    checkpoints.run_dir(home, run),
                    run,
                )
                continue
            try:
                restore_run(store, home, run, app, keep)
            except Exception as e:  # a record it cannot read: said once, the others still restored
                log.error("could not restore run %s from %s: %s", run, checkpoints.run_dir(home, run), e)
        if stop.wait(WATCH_SECONDS):
            return


def _on_disk(home: Path, run: str, missing: type[Exception] = UsageError) -> tuple[RunConfig, int]:
    folder = checkpoints.run_dir(home, run)
    if not keys.NAME.fullmatch(run) or not folder.is_dir():
        raise missing(f"unknown run {run!r}: it is neither in Redis nor on disk under {home / 'runs'}")
    recorded = checkpoints.recorded_name(folder)
    if recorded != run:
        what = f"holds run {recorded!r}, moved aside" if recorded else "holds no model version 0"
        raise missing(f"{folder} {what}: it is no record of run {run!r}")
    versions = checkpoints.versions(home, run)
    try:
        config = checkpoints.read_config(home, run)
    except (OSError, ValueError) as e:
        raise missing(f"run {run!r}: cannot read {folder / 'config.json'} ({e})") from None
    return config, versions[-1]


def _known(store: Store, run: str) -> bool:
    return bool(store.redis.exists(keys.run_version(run)))


def _queue_state(pipe: redis.client.Pipeline, run: str, state: Mapping[str, Any]) -> None:
    """The norm screen's history (newest first, as ``Store.voice_norms``) and the DP clip."""
    norms = [repr(float(n)) for n in state.get("voice_norms") or []]
    pipe.delete(keys.voice_norms(run), keys.dp_clip(run))
    if norms:
        pipe.rpush(keys.voice_norms(run), *norms)
    if state.get("dp_clip") is not None:
        pipe.set(keys.dp_clip(run), repr(float(state["dp_clip"])))


def _queue_credit(
    pipe: redis.client.Pipeline, credit: Mapping[str, ledger.Credit], reputations: Mapping[str, ledger.Credit]
) -> None:
    """Add the run's credit to each volunteer's record; set its latest reputation."""
    for name, record in credit.items():
        key = keys.volunteer(name)
        pipe.sadd(keys.volunteers(), name)
        for field, count in record.counts.items():
            pipe.hincrby(key, field, count)
        if record.train_seconds:
            pipe.hincrbyfloat(key, "train_seconds", record.train_seconds)
        if record.device:
            pipe.hset(key, "device", record.device)
        if record.memory_gb:
            pipe.hset(key, "memory_gb", record.memory_gb)
        latest = reputations.get(name)
        if latest is not None and latest.reputation is not None:
            pipe.hset(key, "reputation", repr(round(latest.reputation, 6)))


def _repost(
    store: Store,
    home: Path,
    run: str,
    config: RunConfig,
    lost: dict[str, Any] | None,
    app: Celery | None,
) -> int | None:
    """Post again the round Redis lost open (an asynchronous run: open its next buffer)."""
    if config.is_async:
        info = open_buffer(store, run, config)
        return int(info["round"]) if info else None
    if lost is None or app is None:
        return None
    shards, quorum = int(lost["shards"]), int(lost["quorum"])
    deadline = float(lost.get("deadline_seconds") or config.deadline)
    info = post_round(store, app, run, shards, quorum, deadline)
    number = int(info["round"])
    ledger.round_opened(
        home,
        run,
        {
            "round": number,
            "shards": shards,
            "quorum": quorum,
            "deadline_seconds": deadline,
            "base_version": info["base_version"],
        },
    )
    log.warning("posted round %d of %s again: Redis lost it open", number, run)
    return number


def _record(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "at"}
