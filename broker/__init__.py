"""Where both sides meet: settings, the Redis key schema and queue names, clients, the embedded server.

Below the coordinator and the volunteer, above ``jobs`` and ``serialization``;
it knows nothing of either side's logic.
"""

from broker.client import check_reachable, redis_client, safe_url
from broker.errors import BrokerError, BrokerUnreachable, EmbeddedRedisError, SettingsError, UnknownRun
from broker.settings import Settings

__all__ = [
    "BrokerError",
    "BrokerUnreachable",
    "EmbeddedRedisError",
    "Settings",
    "SettingsError",
    "UnknownRun",
    "check_reachable",
    "redis_client",
    "safe_url",
]
