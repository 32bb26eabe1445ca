"""Least-privilege Redis ACL users for volunteers (``coordinator volunteer-credentials``).

A volunteer's user may read a run (config, versions, model blobs, round
status), write only its own uploads, append (RPUSH, and nothing else) to the
announcement list ``ct:announce``, the lease hint list ``ct:asks`` and its
own lease requests ``ct:ask:NAME``, read the answers to its own requests
``ct:grant:NAME:*``, and use what Celery and kombu need to pull
``train`` tasks: the ``train`` list, kombu's unacked bookkeeping and bindings
(each through a selector of the commands kombu runs on it, ``KOMBU_SELECTORS``),
pidbox replies, publishing events, and listening (only) on the control
channel. It cannot touch the trusted ``aggregate`` queue at all. Its
credit, the volunteer list and task results are written by the trusted side
only. It gets no dangerous commands (FLUSHALL, CONFIG, KEYS, DEBUG, EVAL, ...). The
read-only key selector ``%R~`` needs Redis 7; older servers are refused with a
clear message. See docs/SECURITY.md for what this does and does not cover.

Behind Redis Sentinel the user is written to every data node the sentinels
know (the primary and each replica, with the same password): replicas do not
replicate ACL commands, and a volunteer must still log in after a replica is
promoted. The URL handed over then lists the sentinels.
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlparse, urlunparse

import redis
from kombu.transport import redis as kombu_redis
from redis.lock import Lock

from broker import keys
from broker.sentinel import SentinelAddress, is_sentinel_url
from coordinator.errors import CredentialsError

MIN_REDIS_MAJOR = 7
PASSWORD_BYTES = 32
PRIORITY_SEP = "\x06\x16"  # kombu.transport.redis: queue name + sep + priority step
# Names an operator must not hand out: they would replace the admin user.
_RESERVED = frozenset({"default"})
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)

# Commands only; keys and channels are limited separately below.
COMMANDS = (
    # connection set-up by redis-py and kombu
    "ping",
    "echo",
    "hello",
    "select",
    "time",
    "client|setinfo",
    "client|setname",
    "client|id",
    "reset",
    "quit",
    # reading a run; kombu reads its bindings and the unacked index
    "get",
    "mget",
    "exists",
    "type",
    "ttl",
    "pttl",
    "strlen",
    "getrange",
    "hget",
    "hmget",
    "hgetall",
    "hexists",
    "hlen",
    "hkeys",
    "smembers",
    "sismember",
    "scard",
    "llen",
    "lrange",
    "lindex",
    "zrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zscore",
    "zcard",
    # writing what a volunteer owns, and kombu/celery's queue bookkeeping
    "set",
    "setex",
    "psetex",
    "setnx",
    "del",
    "unlink",
    "rename",  # a large upload is written to ct:upload:NAME:...:partial, then renamed into place
    "expire",
    "pexpire",
    "hset",
    "hdel",
    "sadd",
    "srem",
    "zadd",
    "zrem",
    "lpush",
    "rpush",
    "brpop",
    "blpop",  # waiting for the answer to a lease request
    "rpop",
    "lpop",
    "brpoplpush",
    "blmove",
    # transactions (Celery's result pipeline) and kombu's mutex, a redis-py Lock whose
    # release is a Lua script: EVALSHA only, so a volunteer cannot load Lua of its own
    # (a busy loop would block the server); commands inside a script are still checked
    # against this user's ACL
    "multi",
    "exec",
    "discard",
    "watch",
    "unwatch",
    "evalsha",
    "script|exists",
    # events, pidbox and result notifications
    "publish",
    "subscribe",
    "unsubscribe",
    "psubscribe",
    "punsubscribe",
)


# kombu's keys, one selector a family: the commands kombu runs on them and no other, so a
# volunteer cannot SET over a queue, DEL it, EXPIRE or RENAME it, or give a key another type.
_TRAIN = keys.TRAIN_QUEUE
KOMBU_SELECTORS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    # pull shard tasks, push them back when a worker restores unacked ones; kombu keeps one
    # list per priority step (QUEUE + "\x06\x16" + step); the routed queues (broker.routing)
    (
        ("brpop", "rpop", "lpush", "rpush", "llen", "exists"),
        (f"~{_TRAIN}", f"~{_TRAIN}{PRIORITY_SEP}*", f"~{_TRAIN}.*"),
    ),
    # kombu's acks_late bookkeeping: a restore watches the hash and sizes an entry before reading it
    (("hset", "hget", "hdel", "hstrlen", "watch"), ("~unacked",)),
    (("zadd", "zrem", "zrange", "zrangebyscore", "zrevrangebyscore"), ("~unacked_index",)),
    (("set", "get", "del", "evalsha"), ("~unacked_mutex",)),  # a redis-py Lock, released by a script
    # kombu declares, looks up, refreshes and sweeps queue bindings (the last two: its scripts)
    (
        ("sadd", "srem", "smembers", "scard", "exists", "del", "zadd", "zrem", "zrangebyscore", "evalsha"),
        ("~_kombu.binding.*", "~_kombu.binding_permanent.*", "~_kombu.binding_deadlines"),
    ),
)


@dataclass(frozen=True)
class VolunteerCredentials:
    """One volunteer's ACL user and the broker URL to give it."""

    name: str
    password: str
    url: str


def check_name(name: str) -> str:
    """The name if it can be an ACL user and a volunteer ``--name``."""
    if not keys.valid_name(name) or name in _RESERVED:
        raise CredentialsError(f"volunteer name {name!r}: {keys.NAME_RULE} (not 'default')")
    return name


def volunteer_rules(name: str, known: Collection[str] | None = None, db: int = 0) -> list[str]:
    """The ACL SETUSER rules (without password) for volunteer ``name``.

    ``known``: the server's command names; commands it lacks (e.g. CLIENT SETINFO
    before Redis 7.2) are left out, since SETUSER refuses unknown names. ``db``: the
    database number of the broker URL, part of kombu's channel names.
    """
    check_name(name)
    patterns = [
        f"%R~{keys.PREFIX}:run:*",  # run config, version, model blobs, round status: read only
        f"%R~{keys.runs()}",
        f"~{keys.upload_pattern(name)}",  # its own uploads (volunteer.store)
        f"~{keys.grant_pattern(name)}",  # the answers to its own lease requests (coordinator.rounds.leases)
        f"%R~{keys.volunteer(name)}",  # its own credit and reputation (volunteer status): read only
        # its own node's control queue (node name NAME@host), declared but fed by pub/sub
        f"~{name}@*.celery.pidbox",
        f"~{name}@*.celery.pidbox{PRIORITY_SEP}*",
        "%W~*.reply.celery.pidbox",  # answers to control commands (ping from status)
    ]
    # kombu prefixes fanout channels with "/DB.". A volunteer publishes task and
    # heartbeat events (Flower) and nothing else: no PUBLISH on the control channel,
    # so it can command no worker. A selector lets it only *listen* there, to answer
    # the operator's pings; PSUBSCRIBE is allowed only for a pattern that equals an
    # ACL channel pattern, so the pidbox one is written out.
    channels = [f"&/{db}.celeryev/*"]
    listen_only = f"(+subscribe +psubscribe +unsubscribe +punsubscribe &/{db}.celery.pidbox)"
    # Announcing an upload and asking for a lease: RPUSH onto the lists, and no other command on
    # them (no read, pop, trim, delete, SET over them or EXPIRE): a selector of its own, as no key
    # pattern says "append only". Only NAME may append to its own request list, which is how the
    # trusted side knows who asked.
    append_only = f"(+rpush ~{keys.announcements()} ~{keys.lease_requests()} ~{keys.lease_inbox(name)})"
    kombu = [
        "(" + " ".join([*(f"+{c}" for c in commands if known is None or c in known), *patterns]) + ")"
        for commands, patterns in KOMBU_SELECTORS
    ]
    return [
        "reset",
        "on",
        "resetkeys",
        "resetchannels",
        "-@all",
        *(f"+{c}" for c in COMMANDS if known is None or c in known),
        *patterns,
        *kombu,
        *channels,
        listen_only,
        append_only,
    ]


def create(
    admin: redis.Redis,
    name: str,
    broker_url: str,
    host: str | None = None,
    replicas: Sequence[redis.Redis] = (),
) -> VolunteerCredentials:
    """Create (or replace the password of) volunteer ``name``'s ACL user, on ``replicas`` too."""
    check_name(name)
    volunteer_url(broker_url, name, "", host)  # a URL we cannot hand over fails before any write
    nodes = (admin, *replicas)
    for node in nodes:  # every node can hold the user before any is written
        require_acl(node)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    for node in nodes:
        preload_scripts(node)
        known = {str(c.decode() if isinstance(c, bytes) else c).lower() for c in node.command_list()}
        try:
            node.execute_command(
                "ACL", "SETUSER", name, *volunteer_rules(name, known, _db(broker_url)), f">{password}"
            )
        except redis.ResponseError as e:
            raise CredentialsError(f"Redis refused ACL SETUSER for {name!r}: {e}") from e
    return VolunteerCredentials(name, password, volunteer_url(broker_url, name, password, host))


def revoke_user(admin: redis.Redis, name: str, replicas: Sequence[redis.Redis] = ()) -> bool:
    """Delete volunteer ``name``'s ACL user (on ``replicas`` too) and close its connections;
    False if none existed."""
    check_name(name)
    nodes = (admin, *replicas)
    for node in nodes:
        require_acl(node)
    removed = sum(int(node.execute_command("ACL", "DELUSER", name)) for node in nodes)
    return removed > 0


def check_host(host: str) -> str:
    """``HOST[:PORT]`` (a DNS name, IPv4 or [IPv6]) or CredentialsError: it goes into a URL."""
    match = _HOST.fullmatch(host)
    port = match.group("port") if match else None
    if match is None or (port is not None and not 1 <= int(port) <= 65535):
        raise CredentialsError(
            f"--host {host!r}: use HOST or HOST:PORT, e.g. broker.example.org:6379 or [2001:db8::1]:6379"
        )
    return host


def volunteer_url(broker_url: str, name: str, password: str, host: str | None = None) -> str:
    """The broker URL with the volunteer's user and password, at ``host[:port]`` if given.

    A sentinel:// broker's URL keeps its sentinels and names the master (``?master_name=``),
    so the volunteer needs no other setting."""
    if is_sentinel_url(broker_url):
        if host:
            raise CredentialsError(
                "--host names one Redis; volunteers of a sentinel:// broker get the sentinels of "
                "--broker, so list there the sentinel addresses volunteers reach"
            )
        return SentinelAddress.parse(broker_url).with_login(name, password).url()
    parts = urlparse(broker_url)
    if parts.scheme not in ("redis", "rediss"):
        raise CredentialsError(
            f"broker URL scheme {parts.scheme!r}: volunteers need a redis://, rediss:// or sentinel:// URL"
        )
    address = parts.netloc.rpartition("@")[2]
    if host:
        check_host(host)
        address = host
        if not re.search(r":\d+$", host.rpartition("]")[2]) and parts.port:
            address += f":{parts.port}"
    netloc = f"{quote(name, safe='')}:{quote(password, safe='')}@{address}"
    return urlunparse((parts.scheme, netloc, parts.path or "/0", "", parts.query, ""))


def command(
    admin: redis.Redis,
    broker_url: str,
    name: str,
    *,
    revoke: bool = False,
    host: str | None = None,
    quiet: bool = False,
    replicas: Sequence[redis.Redis] = (),
) -> dict[str, Any]:
    """``coordinator volunteer-credentials``: create or revoke, print what to hand over.

    ``replicas``: the other data nodes behind Sentinel, which get (or lose) the same user."""
    if revoke:
        removed = revoke_user(admin, name, replicas)
        persisted = all([_save(node) for node in (admin, *replicas)])
        if not quiet:
            print(f"revoked volunteer {name!r}" if removed else f"no volunteer user {name!r}")
        return {"name": name, "revoked": removed, "persisted": persisted}
    made = create(admin, name, broker_url, host, replicas)
    persisted = all([_save(node) for node in (admin, *replicas)])
    # In the environment, not on the command line, where `ps` would show the password.
    start = f"CROWDTRAIN_BROKER_URL='{made.url}' volunteer start --name {name}"
    if not quiet:
        print(made.url)
        print(f"hand this URL to the volunteer, who runs: {start}", file=sys.stderr)
        if not persisted:
            print(
                "note: Redis has no ACL file (--aclfile), so this user is lost when Redis "
                "restarts; see docs/DEPLOYMENT.md",
                file=sys.stderr,
            )
    return {"name": name, "url": made.url, "command": start, "persisted": persisted}


def preload_scripts(admin: redis.Redis) -> None:
    """Load the Lua scripts kombu runs (its mutex, binding refresh), which volunteers may only EVALSHA.

    Scripts do not survive a Redis restart; the aggregator's own kombu reloads them
    when it first needs them, and running this command again does too.
    """
    for script in (
        Lock.LUA_RELEASE_SCRIPT,
        Lock.LUA_EXTEND_SCRIPT,
        Lock.LUA_REACQUIRE_SCRIPT,
        kombu_redis.REFRESH_BINDING,
        kombu_redis.SWEEP_BINDINGS,
    ):
        admin.script_load(script)


def require_acl(admin: redis.Redis) -> None:
    """Raise CredentialsError unless the server supports Redis 7 ACL selectors."""
    try:
        version = str(admin.info("server").get("redis_version", "0"))
    except redis.RedisError as e:
        raise CredentialsError(f"cannot read the Redis server version: {e}") from e
    major = int(version.split(".")[0] or 0)
    if major < MIN_REDIS_MAJOR:
        raise CredentialsError(
            f"volunteer credentials need Redis {MIN_REDIS_MAJOR} or newer (read-only key "
            f"patterns); this broker runs Redis {version}. Use Redis 7 (docker-compose.yml, "
            "or your distribution's redis-server) as the broker"
        )


def _save(admin: redis.Redis) -> bool:
    """ACL SAVE where Redis has an ACL file; False where it has none."""
    try:
        admin.execute_command("ACL", "SAVE")
    except redis.ResponseError:
        return False
    return True


def _db(url: str) -> int:
    if is_sentinel_url(url):
        return SentinelAddress.parse(url).db
    path = urlparse(url).path.strip("/")
    return int(path) if path.isdigit() else 0
