"""``coordinator status``: runs, open rounds, queue depths, volunteers and their credit."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from rich import box
from rich.console import Console
from rich.table import Table

from broker.keys import AGGREGATE_QUEUE, TRAIN_QUEUE
from broker.routing import Need
from coordinator.merging.privacy import from_config, spent
from coordinator.merging.verification import START_REPUTATION
from coordinator.runs.capabilities import Capabilities
from coordinator.store import Store

PING_TIMEOUT = 1.0
_CREDIT = ("shards_done", "samples", "accepted", "rejected")


def collect_status(store: Store, app: Celery, run: str | None = None) -> dict[str, Any]:
    """The ``status --json`` document (docs/ARCHITECTURE.md, "JSON documents")."""
    names = [run] if run else store.runs()
    runs = []
    for name in names:
        config = store.run_config(name)
        current = store.rounds.current(name)
        open_round = None
        if current and current["status"] in ("open", "aggregating"):
            open_round = {
                key: current.get(key)
                for key in ("round", "shards", "quorum", "accepted", "rejected", "late", "status")
            }
        version = store.version(name)
        entry: dict[str, Any] = {
            "run": name,
            "job": config.job,
            "strategy": config.strategy,
            "compression": config.compression,
            "model_version": version,
            "rounds": store.rounds.count(name),
            "open_round": open_round,
            "slices": config.slices,  # init --slices
            "shard_memory_gb": config.shard_memory_gb,  # GB one shard needs (coordinator.runs.slicing)
        }
        need = config.need
        entry["queue"] = need.queue
        if need.queue != TRAIN_QUEUE:
            entry["requires"] = {"device": need.device, "memory_gb": need.memory_gb or None}
        dp = from_config(config)
        if dp is not None:
            entry.update(
                epsilon=spent(dp, version), epsilon_budget=dp.budget, dp_clip=store.dp_clip(name) or dp.clip
            )
        runs.append(entry)
    # who answers, and the queues each consumes: a volunteer that answers and consumes nothing is
    # paused (volunteer pause, or its owner's rules); it keeps its place, unlike one that is gone
    consumers = _consumers(app, _listeners(store.redis))
    online = set(consumers)
    routed = {r["queue"] for r in runs if "requires" in r}
    if routed:
        for entry in runs:
            if "requires" in entry:
                entry["qualified_online"] = sum(entry["queue"] in q for q in consumers.values())
    volunteers = []
    credits = store.volunteers()
    capabilities = Capabilities(store.redis)
    for name in capabilities.claimants():  # one that failed its challenge may have earned nothing yet
        credits.setdefault(name, {})
    claims = capabilities.claims(list(credits))  # its claims as its challenges measured them
    for name, credit in credits.items():
        volunteers.append(
            {
                "name": name,
                "device": credit.get("device") or _claimed_device(claims.get(name)),
                "memory_gb": credit.get("memory_gb"),
                "online": name in online,
                "paused": name in online and not consumers[name],
                **{k: int(credit.get(k, 0)) for k in _CREDIT},
                "samples_per_second": _speed(credit),
                "reputation": float(credit.get("reputation", START_REPUTATION)),
                "claims": claims.get(name),
            }
        )
    return {
        "runs": runs,
        "queues": store.queue_depths(sorted(routed)),
        "volunteers": volunteers,
        "workers_online": sorted(online),
    }


def print_status(document: dict[str, Any], console: Console | None = None) -> None:
    """The human form of ``status``: a runs table, a queues line, a volunteers table."""
    console = console or Console()
    if document["runs"]:
        runs = Table(title="runs", box=box.SIMPLE_HEAD, title_justify="left")
        for column in ("run", "job", "strategy", "compression", "version", "rounds", "open round"):
            runs.add_column(column, justify="right" if column in ("version", "rounds") else "left")
        for r in document["runs"]:
            runs.add_row(
                r["run"],
                r["job"],
                r["strategy"],
                r["compression"],
                str(r["model_version"]),
                str(r.get("rounds", "")),
                _open_round(r["open_round"]),
            )
        console.print(runs)
    elif not document.get("lost_runs"):
        console.print("runs: none yet (coordinator init --run NAME --job charlm)")
    for name in document.get("lost_runs", []):
        console.print(
            f"run {name} is on disk but Redis does not know it (its data was lost?): "
            f"coordinator restore --run {name}"
        )
    for r in document["runs"]:
        if "qualified_online" in r:
            need = Need(r["requires"]["device"], r["requires"]["memory_gb"] or 0)
            count = r["qualified_online"]
            who = "no online volunteer qualifies" if not count else f"{count} online volunteer(s) qualify"
            console.print(f"run {r['run']} needs {need.describe()}: {who}")
    queues = document["queues"]
    shared = (TRAIN_QUEUE, AGGREGATE_QUEUE)
    routed = "".join(f", {name} {depth} waiting" for name, depth in queues.items() if name not in shared)
    console.print(
        f"queues: train {queues[TRAIN_QUEUE]} waiting{routed}, aggregate {queues[AGGREGATE_QUEUE]} waiting"
    )
    if not document["volunteers"]:
        console.print("volunteers: none yet (volunteer start --name NAME)")
        return
    online = sum(v["online"] for v in document["volunteers"])
    people = Table(
        title=f"volunteers ({online} of {len(document['volunteers'])} online)",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    columns = ("name", "device", "online", "shards done", "samples", "accepted", "rejected", "samples/s")
    for column in (*columns, "reputation"):
        people.add_column(column, justify="left" if column in ("name", "device", "online") else "right")
    for v in document["volunteers"]:
        speed = "-" if v["samples_per_second"] is None else f"{v['samples_per_second']:g}"
        credit = (str(v[k]) for k in _CREDIT)
        answers = "paused" if v.get("paused") else "yes" if v["online"] else "no"
        people.add_row(v["name"], v["device"], answers, *credit, speed, f"{v['reputation']:.2f}")
    console.print(people)


def _open_round(info: dict[str, Any] | None) -> str:
    if not info:
        return "-"
    text = f"round {info['round']}: {info['accepted']}/{info['shards']} accepted"
    if info.get("quorum") is not None and info["quorum"] != info["shards"]:
        text += f" (quorum {info['quorum']})"
    if info.get("rejected"):
        text += f", {info['rejected']} rejected"
    return text + f", {info['status']}"


def _consumers(app: Celery, expected: int | None = None) -> dict[str, set[str]]:
    """Queue names each online worker consumes (Celery's ``inspect active_queues``), by node name.

    Every worker that answers is online (it is how ``celery inspect ping`` finds them too).
    With ``expected`` (``_listeners``) the answer comes as soon as that many workers replied,
    else after ``PING_TIMEOUT`` with no reply; ``PING_TIMEOUT`` is the wait for each reply either way.
    """
    try:
        replies = app.control.inspect(timeout=PING_TIMEOUT, limit=expected).active_queues() or {}
    except Exception:  # no broker answer: nobody consumes anything
        return {}
    return {
        node.split("@", 1)[0]: {q.get("name", "") for q in queues if isinstance(q, dict)}
        for node, queues in replies.items()
        if isinstance(queues, list)
    }


def _listeners(client: redis.Redis) -> int | None:
    """How many workers can answer a Celery broadcast at most, or None where Redis does not say.

    A worker (volunteer or aggregator) hears Celery's control broadcasts through one connection
    subscribed to a channel pattern (kombu's Redis fanout), so the connections with a pattern
    subscription bound the replies from above: waiting for that many loses none. Anything else
    with one (Flower, ``celery events``, a second connection) only makes the bound too high, and
    the wait ends at the timeout as it would without it. None (wait for the timeout) where the
    broker's user may not list clients (``CLIENT LIST``) or nobody listens.
    """
    try:
        clients = client.client_list(_type="pubsub")
    except redis.RedisError:
        return None
    listening = sum(1 for c in clients if str(c.get("psub", "0")) not in ("", "0"))
    return listening or None


def _speed(record: dict[str, Any]) -> float | None:
    """Samples per second of training in a volunteer's merged shards; None before any."""
    seconds = float(record.get("train_seconds") or 0)
    return round(int(record.get("samples", 0)) / seconds, 1) if seconds > 0 else None


def _claimed_device(claims: dict[str, Any] | None) -> str:
    """The device class a volunteer with no credit yet claimed in its challenge ("?" if none)."""
    return str(claims["device"]["claimed"]) if claims else "?"
