"""Settings read once from flags and ``CROWDTRAIN_*`` environment variables.

Every process (coordinator CLI, aggregator, volunteer) builds one frozen
``Settings`` in its ``main()`` and passes it down; nothing else reads the
environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from broker.errors import SettingsError
from broker.keys import KEEP_VERSIONS
from broker.sentinel import DEFAULT_MASTER, SentinelAddress, is_sentinel_url

DEFAULT_HOME = ".crowdtrain"
DEFAULT_MERGE_CACHE_MB = 1024
# Unacked train messages are redelivered after this many seconds. Volunteers
# refresh the clock of the message they are working on (see volunteer.worker),
# so only a shard whose volunteer died waits this long, and a long shard is
# never run twice just because it is long.
DEFAULT_VISIBILITY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Settings:
    """What a crowdtrain process needs to know about its surroundings."""

    home: Path = field(default_factory=lambda: Path(DEFAULT_HOME))
    broker_url: str | None = None
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    torch_threads: int | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keep_versions: int = KEEP_VERSIONS  # model versions Redis keeps; older ones stay on disk
    # compressed uploads a merge keeps in memory, so each is read from Redis once (past it: read again)
    merge_cache_mb: int = DEFAULT_MERGE_CACHE_MB
    # a sentinel:// broker: the master's name (a master_name= in the URL wins), the sentinels' own login
    sentinel_master: str = DEFAULT_MASTER
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if self.broker_url is not None:
            scheme = urlparse(self.broker_url).scheme
            if is_sentinel_url(self.broker_url):
                SentinelAddress.parse(self.broker_url, self.sentinel_master)  # names what is wrong
            elif scheme not in ("redis", "rediss", "unix"):
                raise SettingsError(
                    f"broker URL {safe_url(self.broker_url)!r} is not a Redis URL: use redis://host:port/db, "
                    "rediss:// for TLS or sentinel://host:port[;sentinel://host:port...]/db"
                )
        if self.visibility_timeout <= 0:
            raise SettingsError("CROWDTRAIN_VISIBILITY_TIMEOUT must be a positive number of seconds")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise SettingsError("CROWDTRAIN_TORCH_THREADS must be a positive integer")
        if self.keep_versions < 1:
            raise SettingsError("CROWDTRAIN_KEEP_VERSIONS must be a whole number of at least 1")
        if self.merge_cache_mb < 0:
            raise SettingsError("CROWDTRAIN_MERGE_CACHE_MB must be a whole number of MB, 0 or more")

    @classmethod
    def from_env(
        cls, broker_url: str | None = None, env: dict[str, str] | None = None, **overrides
    ) -> Settings:
        """Build settings from flags (which win) and the environment."""
        env = dict(os.environ if env is None else env)
        threads = env.get("CROWDTRAIN_TORCH_THREADS")
        keep = env.get("CROWDTRAIN_KEEP_VERSIONS")
        cache = env.get("CROWDTRAIN_MERGE_CACHE_MB")
        try:
            values: dict[str, Any] = dict(
                home=Path(env.get("CROWDTRAIN_HOME") or DEFAULT_HOME),
                broker_url=broker_url or env.get("CROWDTRAIN_BROKER_URL") or None,
                visibility_timeout=float(
                    env.get("CROWDTRAIN_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT)
                ),
                torch_threads=int(threads) if threads else None,
                tls_ca=env.get("CROWDTRAIN_TLS_CA") or None,
                tls_cert=env.get("CROWDTRAIN_TLS_CERT") or None,
                tls_key=env.get("CROWDTRAIN_TLS_KEY") or None,
                keep_versions=int(keep) if keep else KEEP_VERSIONS,
                merge_cache_mb=int(cache) if cache else DEFAULT_MERGE_CACHE_MB,
                sentinel_master=env.get("CROWDTRAIN_SENTINEL_MASTER") or DEFAULT_MASTER,
                sentinel_username=env.get("CROWDTRAIN_SENTINEL_USERNAME") or None,
                sentinel_password=env.get("CROWDTRAIN_SENTINEL_PASSWORD") or None,
            )
        except ValueError as e:
            raise SettingsError(f"bad CROWDTRAIN_* environment variable: {e}") from e
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_broker(self, url: str) -> Settings:
        """The same settings pointing at another broker (e.g. the embedded one)."""
        return replace(self, broker_url=url)

    @property
    def url(self) -> str:
        """The broker URL; only valid once one is chosen (flag, environment or embedded)."""
        if self.broker_url is None:
            raise SettingsError("no broker chosen: pass --broker or set CROWDTRAIN_BROKER_URL")
        return self.broker_url

    @property
    def sentinel(self) -> SentinelAddress | None:
        """The sentinels, master name and login of a sentinel:// broker; None for any other."""
        if not is_sentinel_url(self.broker_url):
            return None
        return SentinelAddress.parse(self.url, self.sentinel_master)


def safe_url(url: str | None) -> str:
    """The URL with any user and password masked, for messages and logs (each part of a sentinel:// list)."""
    if not url or "@" not in url:
        return url or ""
    if is_sentinel_url(url):
        return ";".join(_masked(part) for part in url.split(";"))
    return _masked(url)


def _masked(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("//")
    return f"{scheme}//***@{rest.rpartition('@')[2]}"
