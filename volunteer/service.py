"""``volunteer install-service``: a per-user service that starts the volunteer at login.

Linux: a systemd user unit, ``$XDG_CONFIG_HOME/systemd/user/crowdtrain-volunteer.service``
(default ``~/.config``), enabled the way ``systemctl --user enable`` does it (a
link in ``default.target.wants``). macOS: a launchd agent,
``~/Library/LaunchAgents/org.crowdtrain.volunteer.plist``, loaded at login.
Both restart the volunteer when it fails, but not after a usage error (exit
2), which would only fail again; both run it at nice 10. Nothing here calls
``systemctl`` or ``launchctl``: the file is written (mode 0600: it may hold the
broker URL) and the message says how to start it now without logging out.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from volunteer.errors import VolunteerError

UNIT = "crowdtrain-volunteer.service"
AGENT = "org.crowdtrain.volunteer"
RESTART_SECONDS = 10
NICE = 10
# What the service carries over from the shell that installed it.
CARRIED = ("CROWDTRAIN_", "PYTHONPATH")


class ServiceError(VolunteerError):
    """No per-user service kind on this platform, or its file cannot be written."""


@dataclass(frozen=True)
class Service:
    """One service file: where it goes, what it says, and how to start it at once."""

    path: Path
    text: str
    enable_hint: str
    link: Path | None = None  # systemd: the link that enables it at login

    def install(self, home: Path) -> Path:
        """Write the file (and enable it); ``home`` (its working folder) is made if missing."""
        try:
            home.mkdir(parents=True, exist_ok=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(self.text)
            os.chmod(partial, 0o600)
            os.replace(partial, self.path)
            if self.link is not None:
                self.link.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    self.link.unlink()
                self.link.symlink_to(os.path.relpath(self.path, self.link.parent))
        except OSError as e:
            raise ServiceError(f"cannot write {self.path}: {e.strerror or e}") from None
        return self.path

    def uninstall(self) -> Path | None:
        """Remove the file (and its link); the path removed, or None when there was none."""
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        try:
            self.path.unlink()
        except FileNotFoundError:
            return None
        return self.path


def environment(env: Mapping[str, str]) -> dict[str, str]:
    """The variables the service keeps (CROWDTRAIN_*, PYTHONPATH), CROWDTRAIN_HOME made absolute."""
    kept = {k: v for k, v in env.items() if k.startswith(CARRIED) and v}
    if "CROWDTRAIN_HOME" in kept:
        kept["CROWDTRAIN_HOME"] = str(Path(kept["CROWDTRAIN_HOME"]).resolve())
    return kept


def for_platform(
    platform: str,
    home: Path,
    start_argv: list[str],
    env: Mapping[str, str],
    config_home: str | None = None,
) -> Service:
    """The service of this platform that runs ``volunteer start START_ARGV`` with ``env``.

    ``config_home`` is ``$XDG_CONFIG_HOME`` (Linux; default ``~/.config``).
    """
    env = {"CROWDTRAIN_HOME": str(home), **env}
    command = [sys.executable, "-m", "cli.volunteer", "start", *start_argv]
    base = Path.home()
    if platform.startswith("linux"):
        folder = Path(config_home or base / ".config") / "systemd" / "user"
        return Service(
            folder / UNIT,
            _systemd(command, env, home),
            "start it now: systemctl --user daemon-reload && systemctl --user start crowdtrain-volunteer",
            link=folder / "default.target.wants" / UNIT,
        )
    if platform == "darwin":
        path = base / "Library" / "LaunchAgents" / f"{AGENT}.plist"
        return Service(path, _launchd(command, env, home), f"start it now: launchctl load -w {path}")
    raise ServiceError(f"no per-user service on {platform}: run `volunteer start` from your login scripts")


def _systemd(command: list[str], env: Mapping[str, str], home: Path) -> str:
    lines = [
        "[Unit]",
        "Description=crowdtrain volunteer (donates this machine's spare time to training runs)",
        "After=network-online.target",
        "",
        "[Service]",
        f"ExecStart={shlex.join(command)}",
        f"WorkingDirectory={home}",
        *(f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in sorted(env.items())),
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        "RestartPreventExitStatus=2",
        f"Nice={NICE}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def _systemd_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _launchd(command: list[str], env: Mapping[str, str], home: Path) -> str:
    document = {
        "Label": AGENT,
        "ProgramArguments": command,
        "EnvironmentVariables": dict(sorted(env.items())),
        "WorkingDirectory": str(home),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # again after a failure, not after a clean stop
        "ThrottleInterval": RESTART_SECONDS,
        "Nice": NICE,
        "StandardOutPath": str(home / "volunteer.log"),
        "StandardErrorPath": str(home / "volunteer.log"),
    }
    return plistlib.dumps(document).decode()
