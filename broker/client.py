"""redis-py clients for crowdtrain's own keys, on the broker's server.

Every client has socket and connect timeouts, TCP keepalive, a health check
of idle connections, and redis-py's own ``Retry`` with exponential backoff, so
a Redis restart or a network blip is waited out for about ``patience``
seconds instead of failing the first command that meets it.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from broker.errors import BrokerUnreachable
from broker.sentinel import FollowPrimaryConnection, sentinel_kwargs
from broker.settings import Settings, safe_url

__all__ = [
    "check_reachable",
    "data_nodes",
    "node_client",
    "redis_client",
    "retries_for",
    "safe_url",
    "sentinel_manager",
    "tls_options",
]

SOCKET_TIMEOUT = 60.0  # per read or write, not per command: a 500 MB blob may take longer
CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 30
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
# How long a client keeps retrying a broker that went away (a Redis restart).
DEFAULT_PATIENCE = 120.0


def redis_client(settings: Settings, *, patience: float = DEFAULT_PATIENCE) -> redis.Redis:
    """A client with timeouts, keepalive, health checks and backoff retries for ``patience`` s.

    Behind Sentinel it is redis-py's ``master_for`` client: each new connection asks
    the sentinels where the primary is, so the retries that wait out a dead primary
    land on the promoted replica.
    """
    options: dict[str, Any] = dict(
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), retries_for(patience)),
    )
    address = settings.sentinel
    if address is not None:
        manager = sentinel_manager(settings, **options)
        return manager.master_for(
            address.master, redis_class=redis.Redis, connection_class=FollowPrimaryConnection
        )
    return redis.Redis.from_url(settings.url, **options, **tls_options(settings))


def sentinel_manager(settings: Settings, **options: Any) -> Sentinel:
    """redis-py's Sentinel for a sentinel:// broker: ``options`` and the data login for the data nodes,
    only socket settings (and CROWDTRAIN_SENTINEL_* logins) for the sentinels."""
    address = settings.sentinel
    assert address is not None, "sentinel_manager needs a sentinel:// broker"
    # a sentinel answers small questions at once: a short read timeout moves on to the next one
    socket = {"socket_timeout": CONNECT_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    return Sentinel(
        list(address.sentinels),
        sentinel_kwargs=sentinel_kwargs(settings.sentinel_username, settings.sentinel_password, socket),
        **options,
        **address.connection_kwargs(),
    )


def data_nodes(settings: Settings) -> list[tuple[str, int]]:
    """The primary and the live replicas of a sentinel:// broker, as the sentinels see them now."""
    address = settings.sentinel
    assert address is not None, "data_nodes needs a sentinel:// broker"
    manager = sentinel_manager(settings)
    try:
        primary = manager.discover_master(address.master)
        replicas = manager.discover_slaves(address.master)
    except redis.RedisError:
        raise _no_primary(settings) from None
    finally:
        for sentinel in manager.sentinels:
            sentinel.close()
    return [(str(host), int(port)) for host, port in [primary, *replicas]]


def check_reachable(settings: Settings) -> None:
    """Ping the broker once, without retries; BrokerUnreachable names the URL and the fix."""
    client = redis_client(settings, patience=0)
    try:
        client.ping()
    except MasterNotFoundError:
        raise _no_primary(settings) from None
    except redis.RedisError as e:
        raise BrokerUnreachable(
            f"cannot reach the broker at {safe_url(settings.url)} ({e}); "
            "start Redis there, or pass --broker / CROWDTRAIN_BROKER_URL"
        ) from None
    finally:
        client.close()


def retries_for(patience: float) -> int:
    """How many backoff steps (BACKOFF_BASE doubling up to BACKOFF_CAP) fill ``patience`` seconds."""
    waited, retries = 0.0, 0
    while waited < patience:
        waited += min(BACKOFF_CAP, BACKOFF_BASE * 2**retries)
        retries += 1
    return retries


def tls_options(settings: Settings) -> dict[str, Any]:
    """ssl_* options for a rediss:// broker (both redis-py and Celery take these names)."""
    if not (settings.broker_url or "").startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.tls_ca:
        options["ssl_ca_certs"] = settings.tls_ca
    if settings.tls_cert:
        options["ssl_certfile"] = settings.tls_cert
    if settings.tls_key:
        options["ssl_keyfile"] = settings.tls_key
    return options


def node_client(settings: Settings, node: tuple[str, int]) -> redis.Redis:
    """A client of one data node of a sentinel:// broker (not following failovers), with its login."""
    address = settings.sentinel
    assert address is not None, "node_client needs a sentinel:// broker"
    host, port = node
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        **address.connection_kwargs(),
    )


def _no_primary(settings: Settings) -> BrokerUnreachable:
    address = settings.sentinel
    master = address.master if address else ""
    return BrokerUnreachable(
        f"no sentinel at {safe_url(settings.url)} names a live primary {master!r} (none answered, "
        "or none knows that name); check the sentinel addresses and CROWDTRAIN_SENTINEL_MASTER "
        "(or ?master_name=)"
    )
