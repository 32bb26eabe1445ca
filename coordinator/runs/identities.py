"""Volunteer identities as the trusted side records them (``coordinator volunteers``).

Each identity has a record in ``ct:identities`` (name -> JSON): when it was
made (``created``) and how (``via``: ``invite`` for ``volunteer join``,
``credentials`` for ``coordinator volunteer-credentials``, ``seen`` for a
volunteer first seen asking for a lease), and when it was revoked. Only the
trusted side writes it. Its credit and reputation stay where the merge keeps
them (``ct:volunteer:NAME``), its similarity group where ``coordinator.merging.sybils`` keeps it
(``ct:clusters``); who is online is who answers a Celery ping now
or asked for a lease within the last minute (``ct:seen``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import Celery
from rich import box
from rich.console import Console
from rich.table import Table

from broker import keys
from coordinator.merging.verification import START_REPUTATION
from coordinator.store import Store

PING_TIMEOUT = 1.0
SEEN_ONLINE = 60.0  # seconds since a volunteer last asked for a lease, for it to count as online
_CREDIT = ("accepted", "rejected", "samples")


def record(client: redis.Redis, name: str, via: str, now: float | None = None) -> bool:
    """Note identity ``name`` (made ``via`` what) unless it has a record; True if it had none."""
    entry = json.dumps({"created": time.time() if now is None else now, "via": via})
    return bool(client.hsetnx(keys.identities(), name, entry))


def reinstate(client: redis.Redis, name: str, via: str, now: float | None = None) -> None:
    """Note credentials made by hand for ``name``: a revoked name given credentials again is merged again."""
    if client.srem(keys.revoked(), name):
        entry = json.dumps({"created": time.time() if now is None else now, "via": via})
        client.hset(keys.identities(), name, entry)
    else:
        record(client, name, via, now)


def note_seen(client: redis.Redis, now: float | None = None) -> int:
    """Give every volunteer that asked for a lease and has no record one (``via: seen``)."""
    now = time.time() if now is None else now
    seen = {n.decode("ascii", "replace") for n in client.zrange(keys.seen(), 0, -1)}
    known = {n.decode("ascii", "replace") for n in client.hkeys(keys.identities())}
    new = [n for n in sorted(seen - known) if keys.valid_name(n)]
    for name in new:
        record(client, name, "seen", now)
    return len(new)


def records(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every identity's record; a record that does not parse counts as empty."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in client.hgetall(keys.identities()).items():
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        out[name.decode("ascii", "replace")] = entry if isinstance(entry, dict) else {}
    return out


def mark_revoked(client: redis.Redis, name: str, now: float | None = None) -> None:
    """Keep the identity's record with its revocation time, and add it to ``ct:revoked``."""
    now = time.time() if now is None else now
    entry = records(client).get(name) or {"via": "unknown"}
    entry["revoked"] = entry.get("revoked") or now
    pipe = client.pipeline()
    pipe.hset(keys.identities(), name, json.dumps(entry))
    pipe.sadd(keys.revoked(), name)
    pipe.execute()


def is_taken(client: redis.Redis, name: str) -> bool:
    """Whether ``name`` is someone's: a record, credit, or a Redis user of that name."""
    pipe = client.pipeline(transaction=False)
    pipe.hexists(keys.identities(), name)
    pipe.sismember(keys.volunteers(), name)
    recorded, credited = pipe.execute()
    return bool(recorded or credited) or acl_user_exists(client, name)


def acl_user_exists(client: redis.Redis, name: str) -> bool:
    """Whether the server has an ACL user ``name`` (False on a server without ACLs)."""
    try:
        return client.execute_command("ACL", "GETUSER", name) is not None
    except redis.ResponseError:
        return False


def collect(store: Store, app: Celery, now: float | None = None) -> dict[str, Any]:
    """The ``volunteers --json`` document: one entry per identity, oldest first."""
    now = time.time() if now is None else now
    client = store.redis
    found = records(client)
    credit = store.volunteers()
    grouped = store.clusters()
    seen = {n.decode("ascii", "replace"): s for n, s in client.zrange(keys.seen(), 0, -1, withscores=True)}
    online = _pinged(app) | {n for n, when in seen.items() if now - when <= SEEN_ONLINE}
    entries = []
    for name in sorted(set(found) | set(credit)):
        entry, mine = found.get(name, {}), credit.get(name, {})
        created = entry.get("created")
        revoked = entry.get("revoked")
        entries.append(
            {
                "name": name,
                "reputation": float(mine.get("reputation", START_REPUTATION)),
                **{k: int(mine.get(k, 0)) for k in _CREDIT},
                "age": round(now - created, 1) if isinstance(created, int | float) else None,
                "online": name in online and not revoked,
                "via": entry.get("via"),
                "revoked": bool(revoked),
                "cluster": grouped.get(name),
            }
        )
    entries.sort(key=lambda e: -float(e["age"] or 0.0))
    return {"volunteers": entries}


def print_volunteers(document: dict[str, Any], console: Console | None = None) -> None:
    """The human form of ``volunteers``: one table."""
    console = console or Console()
    people = document["volunteers"]
    if not people:
        console.print("volunteers: none yet (coordinator invite, then volunteer join TOKEN)")
        return
    table = Table(title=f"volunteers ({len(people)})", box=box.SIMPLE_HEAD, title_justify="left")
    for column in (
        "name",
        "reputation",
        "accepted",
        "rejected",
        "age",
        "online",
        "via",
        "revoked",
        "cluster",
    ):
        table.add_column(
            column, justify="right" if column in ("reputation", "accepted", "rejected", "age") else "left"
        )
    for v in people:
        table.add_row(
            v["name"],
            f"{v['reputation']:.2f}",
            str(v["accepted"]),
            str(v["rejected"]),
            _age(v["age"]),
            "yes" if v["online"] else "no",
            v["via"] or "-",
            "yes" if v["revoked"] else "no",
            v["cluster"] or "-",
        )
    console.print(table)


def _pinged(app: Celery) -> set[str]:
    """Names (before '@') of the Celery nodes that answer a ping; none when the broker is silent."""
    try:
        replies = app.control.ping(timeout=PING_TIMEOUT) or []
    except Exception:
        return set()
    return {node.split("@", 1)[0] for reply in replies for node in reply}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
