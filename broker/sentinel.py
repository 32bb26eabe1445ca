"""Brokers behind Redis Sentinel: ``sentinel://HOST:PORT[;sentinel://HOST:PORT...]/DB``.

Sentinel watches a primary and its replicas and promotes a replica when the
primary dies; clients ask any sentinel where the primary is now. The URL lists
the sentinels (one is enough, more survive a dead sentinel), the database, and
optionally the data nodes' user and password (``sentinel://USER:PASS@HOST:PORT``)
and the master's name (``?master_name=NAME``; else ``CROWDTRAIN_SENTINEL_MASTER``,
default ``mymaster``). Sentinels themselves are asked without a password unless
``CROWDTRAIN_SENTINEL_PASSWORD`` (and ``CROWDTRAIN_SENTINEL_USERNAME``) say
otherwise: the data nodes' ACL users do not exist on sentinels.

kombu and Celery read the same URL (``kombu_url``): every part carries the
credentials and the database, since kombu's connection switches between the
parts when one sentinel does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from redis.sentinel import SentinelManagedConnection

from broker.errors import SettingsError

SCHEME = "sentinel"
DEFAULT_MASTER = "mymaster"
DEFAULT_SENTINEL_PORT = 26379
MASTER_PARAMETER = "master_name"
SEPARATOR = ";"


@dataclass(frozen=True)
class SentinelAddress:
    """Where a sentinel-managed broker is: its sentinels, master name, database and data-node login."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, default_master: str = DEFAULT_MASTER) -> SentinelAddress:
        """Read a ``sentinel://`` URL; SettingsError names what is wrong and the expected form."""
        sentinels: list[tuple[str, int]] = []
        logins: set[tuple[str | None, str | None]] = set()
        dbs: set[int] = set()
        master = default_master
        for part in url.split(SEPARATOR):
            parts = _split(part.strip())
            host, port = _host_port(parts, url)
            sentinels.append((host, port))
            if parts.username is not None or parts.password is not None:
                logins.add((_text(parts.username), _text(parts.password)))
            path = parts.path.strip("/")
            if path:
                if not path.isdigit():
                    raise SettingsError(f"{_form(url)}: the database {path!r} is not a number")
                dbs.add(int(path))
            for key, value in parse_qsl(parts.query, keep_blank_values=True):
                if key != MASTER_PARAMETER or not value:
                    raise SettingsError(f"{_form(url)}: the only query parameter is {MASTER_PARAMETER}=NAME")
                master = value
        if len(logins) > 1 or len(dbs) > 1:
            raise SettingsError(f"{_form(url)}: every sentinel part must name the same user and database")
        username, password = logins.pop() if logins else (None, None)
        return cls(tuple(sentinels), master, dbs.pop() if dbs else 0, username, password)

    def with_login(self, username: str | None, password: str | None) -> SentinelAddress:
        """The same sentinels with another data-node user (a volunteer's own)."""
        return replace(self, username=username, password=password)

    def url(self) -> str:
        """The URL to hand to another process (a volunteer): every part, the master's name."""
        return f"{self.kombu_url()}?{MASTER_PARAMETER}={quote(self.master, safe='')}"

    def kombu_url(self) -> str:
        """The URL for Celery and kombu: login and database on every part, no query."""
        login = ""
        if self.username is not None or self.password is not None:
            login = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return SEPARATOR.join(
            f"{SCHEME}://{login}{_bracket(host)}:{port}/{self.db}" for host, port in self.sentinels
        )

    def connection_kwargs(self) -> dict[str, Any]:
        """The data nodes' login and database, as redis-py connection keywords."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        return kwargs


class FollowPrimaryConnection(SentinelManagedConnection):
    """redis-py's Sentinel-managed connection, whose every reconnect asks the sentinels for the primary.

    redis-py reconnects a connection dropped inside a command (a pipeline, a script) at
    the address it had, and retries that address for as long as its Retry allows
    (redis/redis-py#3874): a dead primary's address, for the whole patience. Here that
    reconnect goes through ``connect``, which asks the sentinels first.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock:
            return
        if retry_socket_connect:  # redis-py's reconnect at the old address: ask the sentinels instead
            self.connect()
            return
        super().connect_check_health(check_health=check_health, retry_socket_connect=False)


def is_sentinel_url(url: str | None) -> bool:
    """Whether ``url`` names a broker through its sentinels."""
    return bool(url) and str(url).strip().lower().startswith(f"{SCHEME}://")


def sentinel_kwargs(username: str | None, password: str | None, socket: dict[str, Any]) -> dict[str, Any]:
    """Keywords of redis-py's connections to the sentinels: the socket settings and their own login."""
    kwargs = dict(socket)
    if password is not None:
        kwargs["password"] = password
        if username is not None:
            kwargs["username"] = username
    return kwargs


def _split(part: str) -> Any:
    try:
        parts = urlsplit(part)
    except ValueError as e:
        raise SettingsError(f"{_form(part)}: {e}") from None
    if parts.scheme != SCHEME:
        raise SettingsError(
            f"broker URL part {parts.scheme or part!r}: with Sentinel every part is "
            "sentinel://HOST:PORT, e.g. sentinel://s1:26379;sentinel://s2:26379/0"
        )
    return parts


def _host_port(parts: Any, url: str) -> tuple[str, int]:
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise SettingsError(f"{_form(url)}: {e}") from None
    if not host:
        raise SettingsError(f"{_form(url)}: a sentinel part names no host")
    return host, port or DEFAULT_SENTINEL_PORT


def _form(url: str) -> str:
    """The URL without passwords, for messages."""
    shown = []
    for part in url.split(SEPARATOR):
        scheme, _, rest = part.strip().partition("//")
        shown.append(f"{scheme}//***@{rest.rpartition('@')[2]}" if "@" in rest else part.strip())
    return f"broker URL {SEPARATOR.join(shown)!r}"


def _text(value: str | None) -> str | None:
    return unquote(value) or None if value else None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
