"""What the owner of a volunteer's machine allows it: when to train and how much of the machine to take.

Read once in ``volunteer start``: from ``CROWDTRAIN_HOME/volunteer.toml`` (or
``--config PATH``), then the command line's options, which win. The TOML file
uses the options' own names without the dashes in front::

    cpu-limit = 50            # percent of the whole machine's CPU time
    idle-minutes = 10         # train only after 10 minutes without keyboard or mouse
    pause-when-busy = 60      # pause while other processes use more than 60% of the machine
    pause-on-battery = true
    exclusive-app = ["steam", "blender"]
    hours = "22-7"            # a daily window, local time; "0-24" is all day
    max-upload-mbps = 10

Every value is checked here, whichever side it came from: a bad one is a
``PreferenceError`` whose message names the setting and the fix.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from volunteer.errors import VolunteerError

CONFIG_FILE = "volunteer.toml"
MAX_CONFIG_BYTES = 64 * 1024
MAX_APPS = 64
HOURS = re.compile(r"^\s*(\d{1,2})\s*-\s*(\d{1,2})\s*$")


class PreferenceError(VolunteerError, ValueError):
    """A preference out of range, a malformed ``--hours``, or an unreadable TOML file."""


@dataclass(frozen=True)
class Preferences:
    """The owner's rules; ``None`` (or False, or empty) means no such rule."""

    cpu_limit: float | None = None  # percent of the machine's CPU time, (0, 100]
    idle_minutes: float | None = None
    pause_when_busy: float | None = None  # percent of the machine's CPU time used by other processes
    pause_on_battery: bool = False
    exclusive_apps: tuple[str, ...] = ()
    hours: tuple[int, int] | None = None  # [start, end) in local hours; start > end crosses midnight
    max_upload_mbps: float | None = None

    def __post_init__(self) -> None:
        _percent("--cpu-limit", self.cpu_limit)
        _percent("--pause-when-busy", self.pause_when_busy)
        _positive("--idle-minutes", self.idle_minutes)
        _positive("--max-upload-mbps", self.max_upload_mbps)
        if not isinstance(self.pause_on_battery, bool):
            raise PreferenceError("pause-on-battery must be true or false")
        if len(self.exclusive_apps) > MAX_APPS:
            raise PreferenceError(f"--exclusive-app: at most {MAX_APPS} names")
        for app in self.exclusive_apps:
            if not isinstance(app, str) or not app.strip() or "/" in app or len(app) > 255:
                raise PreferenceError(
                    f"--exclusive-app {app!r}: give a program's name as the process list shows it "
                    "(e.g. steam), not a path"
                )
        if self.hours is not None:
            start, end = self.hours
            if not (0 <= start <= 23 and 1 <= end <= 24 and start != end):
                raise PreferenceError(
                    f"--hours {start}-{end}: give START-END in whole hours, START 0-23, END 1-24, "
                    "different (e.g. 22-7 for nights, 0-24 for all day)"
                )

    def describe(self) -> str:
        """One line for the log: the rules in force."""
        parts = []
        if self.cpu_limit is not None:
            parts.append(f"cpu limit {self.cpu_limit:g}%")
        if self.idle_minutes is not None:
            parts.append(f"only after {self.idle_minutes:g} idle minutes")
        if self.pause_when_busy is not None:
            parts.append(f"pause when others use > {self.pause_when_busy:g}%")
        if self.pause_on_battery:
            parts.append("pause on battery")
        if self.exclusive_apps:
            parts.append(f"pause while {', '.join(self.exclusive_apps)} run")
        if self.hours is not None:
            parts.append(f"hours {self.hours[0]}-{self.hours[1]}")
        if self.max_upload_mbps is not None:
            parts.append(f"upload at most {self.max_upload_mbps:g} Mbit/s")
        return ", ".join(parts) or "none"


def parse_hours(text: str) -> tuple[int, int]:
    """``"22-7"`` -> (22, 7); anything else is a PreferenceError."""
    match = HOURS.match(str(text))
    if not match:
        raise PreferenceError(f"--hours {text!r}: give START-END in whole hours (e.g. 22-7, 0-24)")
    hours = (int(match.group(1)), int(match.group(2)))
    Preferences(hours=hours)  # range checks
    return hours


def in_window(hours: tuple[int, int] | None, hour: int) -> bool:
    """Whether local ``hour`` (0-23) is in the window ``[start, end)`` (over midnight if start > end)."""
    if hours is None:
        return True
    start, end = hours
    return start <= hour < end if start < end else hour >= start or hour < end


def load(path: Path | None, home: Path, options: dict[str, Any]) -> Preferences:
    """The preferences in force: the TOML file's, with ``options`` (the command line's) over them.

    ``path`` is ``--config``, which must exist; without it the file in ``home``
    is read if there is one.
    """
    explicit = path is not None
    path = path if path is not None else home / CONFIG_FILE
    values = _read_toml(path) if explicit or path.is_file() else {}
    values.update({k: v for k, v in options.items() if v is not None and v != () and v is not False})
    try:
        return Preferences(**values)
    except TypeError as e:  # a wrong type the checks above did not name
        raise PreferenceError(f"{path}: {e}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's settings as Preferences keyword arguments; unknown keys and bad types are errors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise PreferenceError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PreferenceError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PreferenceError(f"{path} is not valid TOML: {e}") from None
    known = {f.name for f in fields(Preferences)}
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        name = "exclusive_apps" if name == "exclusive_app" else name
        if name not in known:
            raise PreferenceError(
                f"{path}: unknown setting {key!r}; known: cpu-limit, idle-minutes, pause-when-busy, "
                "pause-on-battery, exclusive-app, hours, max-upload-mbps"
            )
        values[name] = _toml_value(path, key, name, value)
    return values


def _toml_value(path: Path, key: str, name: str, value: Any) -> Any:
    if name == "hours":
        if not isinstance(value, str):
            raise PreferenceError(f'{path}: {key} must be a string such as "22-7"')
        return parse_hours(value)
    if name == "exclusive_apps":
        apps = [value] if isinstance(value, str) else value
        if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
            raise PreferenceError(f'{path}: {key} must be a name or a list of names, e.g. ["steam"]')
        return tuple(apps)
    if name == "pause_on_battery":
        if not isinstance(value, bool):
            raise PreferenceError(f"{path}: {key} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PreferenceError(f"{path}: {key} must be a number")
    return float(value)


def _percent(flag: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise PreferenceError(f"{flag} {_text(value)}: give a percentage above 0 and at most 100")


def _positive(flag: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise PreferenceError(f"{flag} {_text(value)}: give a number above 0")


def _text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
