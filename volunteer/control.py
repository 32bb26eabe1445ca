"""The volunteer's control socket: ``volunteer pause|resume|status`` reach a running volunteer here.

One Unix socket per running volunteer, ``CROWDTRAIN_HOME/control/NAME.sock``,
in a folder of mode 0700 with the socket itself 0600: only the OS user who
started the volunteer (and root) can connect. It is local by construction (no
port, nothing on the network) and separate from Celery's remote control,
which stays closed to volunteers.

The protocol is one JSON object per line each way: a request
``{"command": "pause" | "resume" | "status"}`` gets the volunteer's status
document (``guest.Watch.status``); anything else gets ``{"error": "..."}``
and the connection is closed. A request is at most ``MAX_REQUEST`` bytes and
must arrive within ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from volunteer.errors import VolunteerError

log = logging.getLogger("crowdtrain.volunteer")

FOLDER = "control"
MAX_REQUEST = 4096
MAX_REPLY = 1 << 20
TIMEOUT = 5.0
COMMANDS = ("pause", "resume", "status")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(VolunteerError):
    """No volunteer answers on this machine (or not the one named)."""


def folder(home: Path) -> Path:
    return home / FOLDER


def socket_path(home: Path, name: str) -> Path:
    return folder(home) / f"{name}.sock"


class ControlServer:
    """Serves one volunteer's socket from a daemon thread, one connection at a time."""

    def __init__(self, home: Path, name: str, handler: Handler) -> None:
        self.path = socket_path(home, name)
        self.handler = handler
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Make the owner-only folder and socket, and serve in the background."""
        place = self.path.parent
        place.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(place, 0o700)  # an existing folder too: nobody else may even look up names in it
        if _answers(self.path):
            raise ControlError(f"a volunteer named {self.path.stem!r} already runs here ({self.path})")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a volunteer that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no moment when others may connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        self._sock = sock
        threading.Thread(target=self._serve, name="control-socket", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # whatever a client sends, the volunteer goes on
                    log.exception("control request failed")

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            line = _read_line(conn, MAX_REQUEST)
            if not line.strip():
                return  # a probe (``running``): connected and went
            request = json.loads(line)
            if not isinstance(request, dict) or request.get("command") not in COMMANDS:
                raise ValueError(f'expected {{"command": one of {", ".join(COMMANDS)}}}')
            reply = self.handler(request)
        except (ValueError, OSError, RecursionError) as e:
            reply = {"error": f"malformed request: {e}"[:300]}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")


def request(path: Path, command: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one command to the volunteer listening at ``path``; its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        line = _read_line(sock, MAX_REPLY)
        if not line:
            raise ValueError("the volunteer closed the connection without a reply")
        reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ValueError("the volunteer's reply is not a JSON object")
    return reply


def running(home: Path, name: str | None = None) -> list[Path]:
    """The sockets of the volunteers that answer under ``home`` (only ``name``'s, if given)."""
    place = folder(home)
    if name is not None:
        path = socket_path(home, name)
        if not _answers(path):
            raise ControlError(f"no volunteer named {name!r} is running here (no answer at {path})")
        return [path]
    found = sorted(p for p in place.glob("*.sock") if _answers(p)) if place.is_dir() else []
    if not found:
        raise ControlError(f"no volunteer is running here (none answers in {place}): volunteer start")
    return found


def private(path: Path) -> bool:
    """Whether ``path`` (the folder or a socket) is its owner's alone."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode & 0o077 == 0 and path.stat().st_uid == os.getuid()


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
        return True
    except OSError:
        return False


def _read_line(sock: socket.socket, limit: int) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"longer than {limit} bytes")
    return bytes(data.split(b"\n", 1)[0])
