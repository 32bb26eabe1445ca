"""``coordinator revoke NAME``: a volunteer's credentials and pending work go.

In this order, so that nothing it does meanwhile survives:
1. its Redis user is deleted (ACL DELUSER, which also closes its
   connections; CLIENT KILL USER closes any left), so it can no longer read
   or write anything;
2. it joins ``ct:revoked`` (trusted side only): the merge refuses every copy
   of a revoked volunteer it finds in a round (``split_revoked``), which
   covers a round that was already being merged;
3. its uploads still in Redis are deleted unread, and its lease requests;
4. in every unfinished round its leases go (the shards are offered again)
   and, while the round is open, its accepted copies stop counting and are
   deleted (``lua/withdraw.lua``).

Its record (``coordinator.runs.identities``) and its credit stay, marked revoked,
so its name is never handed out again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from broker import keys
from coordinator.errors import UsageError
from coordinator.rounds.state import lua_source
from coordinator.runs import credentials, identities
from coordinator.runs.invitations import save_acl
from coordinator.store import Store

log = logging.getLogger("crowdtrain.revocation")
SCAN_BATCH = 1000


def revoke(store: Store, name: str, replicas: Sequence[redis.Redis] = ()) -> dict[str, Any]:
    """Revoke volunteer ``name``; UsageError for a name no one has."""
    client = store.redis
    credentials.check_name(name)
    if not identities.is_taken(client, name):
        raise UsageError(f"unknown volunteer {name!r}: 'coordinator volunteers' lists them")
    had_user = credentials.revoke_user(client, name, replicas)
    try:
        client.execute_command("CLIENT", "KILL", "USER", name)
    except redis.ResponseError:
        pass  # no such user any more: DELUSER closed its connections already
    identities.mark_revoked(client, name)
    uploads = _scan(client, keys.upload_pattern(name)) + _scan(client, keys.grant_pattern(name))
    store.delete_upload(*uploads, keys.lease_inbox(name))
    client.zrem(keys.seen(), name)
    released, withdrawn = _withdraw(client, name)
    store.delete_upload(*withdrawn)
    persisted = save_acl(client)
    log.info(
        "revoked %s: %d uploads deleted, %d leases released, %d copies withdrawn",
        name,
        len(uploads),
        released,
        len(withdrawn),
    )
    return {
        "name": name,
        "revoked": True,
        "user_deleted": had_user,
        "uploads_deleted": len(uploads),
        "leases_released": released,
        "accepted_withdrawn": len(withdrawn),
        "persisted": persisted,
    }


def split_revoked(client: redis.Redis, copies: dict[int, str]) -> tuple[dict[int, str], dict[int, str]]:
    """(copies to merge, shard -> volunteer of the copies of revoked volunteers)."""
    if not copies:
        return copies, {}
    owners = {shard: keys.volunteer_of(key) for shard, key in copies.items()}
    names = sorted(set(owners.values()))
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.sismember(keys.revoked(), n)
    gone = {n for n, member in zip(names, pipe.execute(), strict=True) if member}
    if not gone:
        return copies, {}
    kept = {s: k for s, k in copies.items() if owners[s] not in gone}
    return kept, {s: owners[s] for s in copies if owners[s] in gone}


def _withdraw(client: redis.Redis, name: str) -> tuple[int, list[str]]:
    """Release ``name``'s leases in every unfinished round and withdraw its accepted copies."""
    script = client.register_script(lua_source("withdraw"))
    released, withdrawn = 0, []
    for member in client.zrange(keys.deadlines(), 0, -1):
        run, number = keys.parse_deadline_member(member.decode())
        reply = script(
            keys=[
                keys.round_(run, number),
                keys.round_accepted(run, number),
                keys.round_replicas(run, number),
                keys.leases(run, number),
            ],
            args=[name],
        )
        released += int(reply[0])
        withdrawn += [copy.decode() for copy in reply[1:]]
    return released, withdrawn


def _scan(client: redis.Redis, pattern: str) -> list[str]:
    return [key.decode() for key in client.scan_iter(match=pattern, count=SCAN_BATCH)]
