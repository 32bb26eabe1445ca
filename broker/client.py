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

from broker.errors import BrokerUnreachable
from broker.settings import Settings, safe_url

__all__ = ["check_reachable", "redis_client", "retries_for", "safe_url", "tls_options"]

SOCKET_TIMEOUT = 60.0  # per read or write, not per command: a 500 MB blob may take longer
CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 30
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
# How long a client keeps retrying a broker that went away (a Redis restart).
DEFAULT_PATIENCE = 120.0


def redis_client(settings: Settings, *, patience: float = DEFAULT_PATIENCE) -> redis.Redis:
    """A client with timeouts, keepalive, health checks and backoff retries for ``patience`` s."""
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), retries_for(patience)),
        **tls_options(settings),
    )


def check_reachable(settings: Settings) -> None:
    """Ping the broker once, without retries; BrokerUnreachable names the URL and the fix."""
    client = redis_client(settings, patience=0)
    try:
        client.ping()
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
