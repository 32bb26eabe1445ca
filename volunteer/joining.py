"""``volunteer join TOKEN``: trade an invitation token for this volunteer's own credentials.

The token is the broker URL of the shared joiner user, whose password is the
invitation's secret (``coordinator invite``). With it this side may only push
a join request and take (GETDEL) the answer to it: it pushes
``join|SECRET|NONCE|NAME`` with a NONCE of 32 random bytes, and polls
``ct:join:reply:NONCE`` until the coordinator's aggregator answers. The
answer holds the new user's password; the credentials (the broker URL with
that user) are saved to ``CROWDTRAIN_HOME/volunteer-credentials.json``,
readable by this user only (0600), where ``volunteer start`` finds them when
no broker is given.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse, urlunparse

import redis

from broker import keys
from broker.client import redis_client
from broker.settings import Settings
from volunteer.errors import VolunteerError

CREDENTIALS_FILE = "volunteer-credentials.json"
DEFAULT_TIMEOUT = 60.0
POLL = 0.2
MAX_FILE = 64 * 1024
MAX_PASSWORD = 256


def parse_token(token: str) -> tuple[str, str]:
    """(the broker URL without user, the invitation's secret) of a token; VolunteerError otherwise."""
    parts = urlparse(token.strip())
    user, secret = unquote(parts.username or ""), unquote(parts.password or "")
    if parts.scheme not in ("redis", "rediss") or user != keys.JOINER or not keys.SECRET.fullmatch(secret):
        raise VolunteerError(
            "this is not an invitation token: ask the operator for the output of 'coordinator invite'"
        )
    address = parts.netloc.rpartition("@")[2]
    return urlunparse((parts.scheme, address, parts.path or "/0", "", parts.query, "")), secret


def credentials_path(home: Path) -> Path:
    """Where ``join`` saves, and ``start`` reads, this volunteer's credentials."""
    return home / CREDENTIALS_FILE


def join(settings: Settings, token: str, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Ask to join as ``name``; save the credentials under ``settings.home``; what was saved."""
    if not keys.valid_name(name):
        raise VolunteerError(f"--name {name!r}: {keys.NAME_RULE}")
    path = credentials_path(settings.home)
    if path.exists():
        raise VolunteerError(
            f"this CROWDTRAIN_HOME has joined already ({path}); remove that file, or use another "
            "CROWDTRAIN_HOME, to join again"
        )
    address, secret = parse_token(token)
    client = redis_client(settings.with_broker(token.strip()), patience=0)
    nonce = secrets.token_hex(32)
    try:
        client.rpush(keys.join_requests(), keys.join_request(secret, nonce, name))
        answer = _wait_answer(client, nonce, timeout)
    except redis.AuthenticationError:
        raise VolunteerError(
            "the broker refused this token: the invitation is used up, expired or revoked; "
            "ask the operator for another"
        ) from None
    except redis.RedisError as e:
        raise VolunteerError(f"cannot reach the broker of this token ({e})") from None
    finally:
        client.close()
    if not answer.get("ok"):
        raise VolunteerError(f"the coordinator refused to let {name!r} join: {answer.get('reason', '?')}")
    password = answer.get("password")
    if answer.get("name") != name or not isinstance(password, str) or not 0 < len(password) <= MAX_PASSWORD:
        raise VolunteerError("the coordinator's answer was malformed; try again")
    url = _with_user(address, name, password)
    _save(path, {"name": name, "url": url})
    return {"name": name, "credentials": str(path)}


def saved_url(home: Path) -> str | None:
    """The broker URL that ``join`` saved under ``home``; None if it has not joined."""
    path = credentials_path(home)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_FILE))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise VolunteerError(f"cannot read the saved credentials {path} ({e}); join again") from None
    url = data.get("url") if isinstance(data, dict) else None
    if not isinstance(url, str) or urlparse(url).scheme not in ("redis", "rediss"):
        raise VolunteerError(f"the saved credentials {path} hold no broker URL; join again")
    return url


def _wait_answer(client: redis.Redis, nonce: str, timeout: float) -> dict[str, Any]:
    """Poll for the answer to our request (GETDEL: it is read once); VolunteerError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        raw = client.getdel(keys.join_reply(nonce))
        if raw is not None:
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise VolunteerError("the coordinator's answer was malformed; try again")
            return answer
        if time.monotonic() >= deadline:
            raise VolunteerError(
                f"no answer from the coordinator in {timeout:g} s: its aggregator answers joins; "
                "ask the operator whether it runs"
            )
        time.sleep(POLL)


def _with_user(address: str, name: str, password: str) -> str:
    parts = urlparse(address)
    netloc = f"{quote(name, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunparse((parts.scheme, netloc, parts.path, "", parts.query, ""))


def _save(path: Path, data: dict[str, str]) -> None:
    """Write ``data`` to ``path`` readable by this user only, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.write("\n")
        os.chmod(partial, 0o600)  # whatever the umask
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
