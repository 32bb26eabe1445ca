"""``coordinator status``: runs, open rounds, queue depths, volunteers and their credit."""

from __future__ import annotations

from typing import Any

from celery import Celery
from rich.console import Console
from rich.table import Table

from coordinator.store import Store
from tasks.app import AGGREGATE_QUEUE, TRAIN_QUEUE

PING_TIMEOUT = 1.0


def collect_status(store: Store, app: Celery, run: str | None = None) -> dict[str, Any]:
    """The ``status --json`` document of DESIGN.md."""
    names = [run] if run else store.runs()
    runs = []
    for name in names:
        config = store.run_config(name)
        current = store.current_round(name)
        open_round = None
        if current and current["status"] in ("open", "aggregating"):
            open_round = {"round": current["round"], "shards": current["shards"],
                          "accepted": current["accepted"], "rejected": current["rejected"],
                          "status": current["status"]}
        runs.append({"run": name, "job": config["job"], "strategy": config["strategy"],
                     "compression": config["compression"], "model_version": store.version(name),
                     "rounds": store.round_count(name), "open_round": open_round})
    online = _online_nodes(app)
    volunteers = []
    for name, credit in store.volunteers().items():
        volunteers.append({"name": name, "device": credit.get("device", "?"),
                           "online": name in online,
                           **{k: int(credit.get(k, 0)) for k in
                              ("shards_done", "samples", "accepted", "rejected")}})
    return {"runs": runs, "queues": store.queue_depths((TRAIN_QUEUE, AGGREGATE_QUEUE)),
            "volunteers": volunteers, "workers_online": sorted(online)}


def print_status(document: dict[str, Any]) -> None:
    console = Console()
    runs = Table(title="runs")
    for column in ("run", "job", "strategy", "compression", "version", "open round"):
        runs.add_column(column)
    for r in document["runs"]:
        o = r["open_round"]
        runs.add_row(r["run"], r["job"], r["strategy"], r["compression"], str(r["model_version"]),
                     f"{o['round']}: {o['accepted']}/{o['shards']} accepted" if o else "-")
    console.print(runs)
    queues = document["queues"]
    console.print(f"queues: train {queues[TRAIN_QUEUE]}, aggregate {queues[AGGREGATE_QUEUE]}")
    people = Table(title="volunteers")
    for column in ("name", "device", "online", "shards done", "samples", "accepted", "rejected"):
        people.add_column(column)
    for v in document["volunteers"]:
        people.add_row(v["name"], v["device"], "yes" if v["online"] else "no", str(v["shards_done"]),
                       str(v["samples"]), str(v["accepted"]), str(v["rejected"]))
    console.print(people)


def _online_nodes(app: Celery) -> set[str]:
    """Names (the part before '@') of the Celery nodes that answer a ping."""
    try:
        replies = app.control.ping(timeout=PING_TIMEOUT) or []
    except Exception:  # no broker answer means nobody is online
        return set()
    return {node.split("@", 1)[0] for reply in replies for node in reply}
