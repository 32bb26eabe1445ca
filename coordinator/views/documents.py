"""The ``--json`` documents (docs/ARCHITECTURE.md, "JSON documents"): a round's record, a run's report."""

from __future__ import annotations

import json
from typing import Any

from broker.run_config import RunConfig
from coordinator.store import Store


def round_record(store: Store, run: str, number: int) -> dict[str, Any]:
    """One entry of the ``rounds`` list of the ``--json`` document."""
    info = store.rounds.info(run, number) or {}
    summary = json.loads(info["summary"]) if isinstance(info.get("summary"), str) else {}
    rejections = store.rounds.rejections(run, number)
    record = {
        "round": number,
        "status": info.get("status"),
        "model_version": summary.get("model_version", info.get("base_version")),
        "shards": info.get("shards"),
        "accepted": summary.get("accepted", info.get("accepted", 0)),
        "samples": summary.get("samples", 0),
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
    if info.get("reason"):
        record["reason"] = info["reason"]
    if "epsilon" in summary:
        record["epsilon"] = summary["epsilon"]
    if "staleness" in summary:  # an asynchronous run: the oldest delta merged, in versions
        record["staleness"] = summary["staleness"]
    # --work-check, --outliers drop
    for key in ("work_checked", "work_marked", "work_steps", "work_seconds", "outliers"):
        if key in summary:
            record[key] = summary[key]
    return record


def run_document(store: Store, run: str, rounds: list[int]) -> dict[str, Any]:
    """The JSON of ``run``, ``post-round --wait`` and ``quickstart``."""
    records = [round_record(store, run, n) for n in rounds]
    return document_of(run, store.run_config(run), records, store.version(run))


def document_of(
    run: str, config: RunConfig, records: list[dict[str, Any]], current: int | None
) -> dict[str, Any]:
    """A run's JSON from its config, its rounds' records and its current version (Redis or disk)."""
    evaluated = [r for r in records if r.get("eval_loss") is not None]
    initial = dict(config.initial)
    last = evaluated[-1] if evaluated else {"eval_loss": initial.get("eval_loss")}
    final = {"model_version": current, "eval_loss": last.get("eval_loss")}
    if "eval_accuracy" in last:
        final["eval_accuracy"] = last["eval_accuracy"]
    return {
        "run": run,
        "job": config.job,
        "strategy": config.strategy,
        "compression": config.compression,
        "rounds": records,
        "initial": {"model_version": 0, **initial},
        "final": final,
    }
