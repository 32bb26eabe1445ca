"""Invitations: ``coordinator invite`` makes a token, ``volunteer join`` trades it for credentials.

Only the trusted side can create a Redis user (ACL SETUSER), and a volunteer
holding only a token has none yet. So the token is a broker URL of one
shared, tiny Redis user, ``crowdtrain-joiner``, whose password is the
invitation's secret (32 random bytes, hex)::

    redis://crowdtrain-joiner:SECRET@broker.example.org:6379/0

Redis keeps each live invitation's SHA-256 as one of the joiner's passwords
(``ACL SETUSER crowdtrain-joiner #DIGEST``), and the invitation itself under
``ct:invite:DIGEST`` (uses left, expiry): the secret is stored nowhere. The
joiner may RPUSH onto ``ct:join:requests`` and GETDEL keys under
``ct:join:reply:``, nothing else (no read of the list, no KEYS or SCAN).

A volunteer pushes ``join|SECRET|NONCE|NAME`` (``broker.keys.join_request``),
NONCE being 32 random bytes of its own. The aggregator's join thread
(``serve``) takes requests off the list a batch at a time (longer entries are
dropped on the server, unread; the list is capped), checks every field, uses
the invitation once in ``lua/redeem.lua`` (uses decremented atomically, the
name reserved in the same step, a name already anyone's refused), creates the
volunteer's own user with ``coordinator.runs.credentials.create`` and writes its
password to ``ct:join:reply:NONCE`` for ``REPLY_TTL`` seconds. An invitation
used up or expired loses its joiner password at once: its token no longer
even logs in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis

from broker import keys
from broker.throttle import throttle
from coordinator.errors import CredentialsError
from coordinator.rounds.state import lua_source
from coordinator.runs import credentials, identities
from coordinator.store import Store

log = logging.getLogger("crowdtrain.invitations")
throttle(log.name)  # each bogus request is a token holder's to multiply

DEFAULT_USES = 1
DEFAULT_EXPIRES = 7 * 24 * 3600.0
MAX_USES = 100_000
MAX_EXPIRES = 365 * 24 * 3600.0
SECRET_BYTES = 32
BATCH = 64  # requests answered at a time
MAX_REQUEST = 200  # bytes: "join|" + two secrets of 64 + a name of 64 + separators is 198
MAX_BACKLOG = 1000  # requests the list may hold; the newest beyond are dropped unread
REPLY_TTL = 60  # seconds an answer waits for its volunteer
POLL = 0.2  # seconds between looks at the request list
ERROR_PAUSE = 1.0
SEEN_EVERY = 5.0  # seconds between notes of volunteers first seen (coordinator.runs.identities)
RESERVED = frozenset({"default", keys.JOINER})


@dataclass(frozen=True)
class Invitation:
    """A token and what it allows."""

    token: str
    uses: int
    expires: float


def joiner_rules(known: Collection[str] | None = None, db: int = 0) -> list[str]:
    """The joiner's ACL rules without its passwords: RPUSH a request, GETDEL an answer.

    ``known``: the server's command names; CLIENT SETINFO (what redis-py sends on
    connecting) is left out where the server lacks it, as SETUSER refuses it there.
    ``db``: the broker URL's database; SELECT is granted only when it is not 0, so
    that a token holder cannot push requests into a database nobody drains.
    """
    connecting = ("ping", "hello", "client|setinfo", *(("select",) if db else ()))
    return [
        "on",
        "resetkeys",
        "resetchannels",
        "clearselectors",
        "-@all",
        *(f"+{c}" for c in connecting if known is None or c in known),
        f"(+rpush ~{keys.join_requests()})",
        f"(+getdel ~{keys.join_reply_pattern()})",
    ]


def ensure_joiner(admin: redis.Redis, db: int = 0) -> None:
    """Create the joiner user, or put its rules back, keeping the passwords of live invitations."""
    known = {str(c.decode() if isinstance(c, bytes) else c).lower() for c in admin.command_list()}
    try:
        admin.execute_command("ACL", "SETUSER", keys.JOINER, *joiner_rules(known, db))
    except redis.ResponseError as e:
        raise CredentialsError(f"Redis refused ACL SETUSER for {keys.JOINER!r}: {e}") from e


def create(
    admin: redis.Redis,
    broker_url: str,
    uses: int = DEFAULT_USES,
    expires: float = DEFAULT_EXPIRES,
    host: str | None = None,
    now: float | None = None,
) -> Invitation:
    """Store a new invitation for ``uses`` joins within ``expires`` seconds; its token."""
    credentials.require_acl(admin)
    ensure_joiner(admin, _db(broker_url))
    now = time.time() if now is None else now
    secret = secrets.token_hex(SECRET_BYTES)
    digest = _digest(secret)
    token = credentials.volunteer_url(broker_url, keys.JOINER, secret, host)  # checks the scheme first
    until = now + expires
    pipe = admin.pipeline()
    pipe.hset(keys.invitation(digest), mapping={"uses": uses, "expires": until, "created": now})
    pipe.zadd(keys.invitations(), {digest: until})
    pipe.execute()
    admin.execute_command("ACL", "SETUSER", keys.JOINER, f"#{digest}")
    save_acl(admin)
    return Invitation(token, uses, until)


def command(
    admin: redis.Redis, broker_url: str, uses: int, expires: float, host: str | None, quiet: bool
) -> dict[str, Any]:
    """``coordinator invite``: print the token (stdout) and how to use it (stderr)."""
    made = create(admin, broker_url, uses, expires, host)
    if not quiet:
        print(made.token)
        print(
            f"valid for {uses} join{'s' if uses != 1 else ''} until "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(made.expires))}; the volunteer "
            "runs: volunteer join TOKEN --name NAME (the aggregator answers joins)",
            file=sys.stderr,
        )
    return {"token": made.token, "uses": uses, "expires": made.expires}


class Joins:
    """Answers join requests: one invitation use, one new volunteer user, one answer each."""

    def __init__(
        self,
        store: Store,
        broker_url: str,
        backlog: int = MAX_BACKLOG,
        replicas: Callable[[], Sequence[redis.Redis]] = tuple,
    ) -> None:
        self.redis = store.redis
        self.broker_url = broker_url
        self.replicas = replicas  # behind Sentinel: the other data nodes, which get each new user too
        self.backlog = backlog
        self._drain = self.redis.register_script(lua_source("drain"))
        self._redeem = self.redis.register_script(lua_source("redeem"))
        self._noted = 0.0

    def drain(self, now: float | None = None) -> int:
        """Answer one batch of requests and retire expired invitations; how many entries were taken."""
        now = time.time() if now is None else now
        self.retire_expired(now)
        if now - self._noted >= SEEN_EVERY:
            self._noted = now
            identities.note_seen(self.redis, now)
        dropped, entries = self._drain(keys=[keys.join_requests()], args=[BATCH, MAX_REQUEST, self.backlog])
        if dropped:
            log.warning("dropped %d join requests too long or beyond the list's %d", dropped, self.backlog)
        for raw in entries:
            parsed = keys.parse_join_request(raw.decode("ascii", "replace"))
            if parsed is None:
                log.warning("dropped a malformed join request: %r", raw[:80])
                continue
            secret, nonce, name = parsed
            answer = self.answer(secret, name, now)
            self.redis.set(keys.join_reply(nonce), json.dumps(answer), ex=REPLY_TTL)
        return len(entries)

    def answer(self, secret: str, name: str, now: float) -> dict[str, Any]:
        """Use the invitation for ``name``; the answer (with the new user's password) or why not."""
        if name in RESERVED:
            return _refused(f"the name {name!r} is reserved: choose another with --name")
        if identities.acl_user_exists(self.redis, name):
            return _refused(f"the name {name!r} is taken: choose another with --name")
        digest = _digest(secret)
        entry = json.dumps({"created": now, "via": "invite"})
        outcome, left = self._redeem(
            keys=[keys.invitation(digest), keys.identities(), keys.volunteers()], args=[name, now, entry]
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome != "ok":
            if outcome in ("expired", "used-up"):
                self.retire(digest)
            reasons = {
                "unknown": "this invitation is not known (revoked, used up or mistyped)",
                "expired": "this invitation has expired: ask the operator for another",
                "used-up": "this invitation has been used as many times as it allows",
                "taken": f"the name {name!r} is taken: choose another with --name",
            }
            log.info("refused a join as %s: %s", name, outcome)
            return _refused(reasons.get(outcome, outcome))
        try:
            made = credentials.create(self.redis, name, self.broker_url, replicas=self.replicas())
        except (CredentialsError, redis.ResponseError) as e:
            pipe = self.redis.pipeline()  # give the use and the name back
            pipe.hincrby(keys.invitation(digest), "uses", 1)
            pipe.hdel(keys.identities(), name)
            pipe.execute()
            log.warning("could not create a user for joining volunteer %s: %s", name, e)
            return _refused(f"the coordinator could not create your credentials ({e})")
        if int(left) <= 0:
            self.retire(digest)
        save_acl(self.redis)
        log.info("volunteer %s joined (%d use(s) left on its invitation)", name, int(left))
        return {"ok": True, "name": made.name, "password": made.password}

    def retire(self, digest: str) -> None:
        """An invitation's end: its joiner password goes, then its record."""
        try:
            self.redis.execute_command("ACL", "SETUSER", keys.JOINER, f"!{digest}")
        except redis.ResponseError:
            pass  # that password was gone already
        pipe = self.redis.pipeline()
        pipe.zrem(keys.invitations(), digest)
        pipe.delete(keys.invitation(digest))
        pipe.execute()

    def retire_expired(self, now: float) -> int:
        """Retire every invitation past its expiry."""
        due = [d.decode() for d in self.redis.zrangebyscore(keys.invitations(), "-inf", now)]
        for digest in due:
            self.retire(digest)
        return len(due)


def serve(joins: Joins, stop: threading.Event) -> None:
    """Answer join requests until ``stop`` is set."""
    while not stop.is_set():
        pause = POLL
        try:
            if joins.drain() >= BATCH:
                continue  # more are waiting
        except Exception as e:  # a broker outage, or a broker without ACLs, must not kill the worker
            log.warning("join requests: %s (retrying)", e)
            pause = ERROR_PAUSE
        stop.wait(pause)


def _refused(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason}


def _digest(secret: str) -> str:
    """What Redis and ``ct:invite:`` keep of a secret: its SHA-256 (the ACL password hash)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _db(url: str) -> int:
    path = urlparse(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def save_acl(admin: redis.Redis) -> bool:
    """ACL SAVE where Redis has an ACL file, so joined users and invitations survive a restart."""
    try:
        admin.execute_command("ACL", "SAVE")
    except redis.ResponseError:
        return False
    return True
