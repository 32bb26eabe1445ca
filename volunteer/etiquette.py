"""When a guest trains: the owner's rules (``Preferences``) against what the machine says now.

``Signals`` reads the machine: battery, time since the last keyboard or mouse
input, other processes' CPU use, the names of running programs. Battery and
processes come from psutil. Idle time comes from ``ioreg`` on macOS and from
``xprintidle`` under X11 on Linux; elsewhere (Wayland, a server without a
display, Windows) the platform does not say, ``--idle-minutes`` is ignored and
the log says so once.

Two signals can be pointed at a file instead, for tests and for machines whose
own source is wrong (``volunteer start`` reads the variables once):

- ``CROWDTRAIN_BATTERY_FILE``: a file holding ``PERCENT plugged`` or
  ``PERCENT battery`` (e.g. ``35 battery``); a missing or empty file means no battery.
- ``CROWDTRAIN_IDLE_FILE``: a file holding the seconds since the last input.

``Governor`` turns one reading into the reasons to pause, in a fixed order
(manual, battery, busy, idle, hours, exclusive-app). On battery it pauses and,
once on mains again, waits for the charge to reach ``RESUME_CHARGE`` percent
before it trains again (hysteresis: a laptop plugged in at 5% charges first).

``Throttle`` holds ``--cpu-limit`` by duty-cycling: between two training steps
it sleeps long enough that the process's CPU time stays under its share of
the machine's (all cores together), whatever ``nice`` would allow.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from volunteer.preferences import Preferences, in_window

log = logging.getLogger("crowdtrain.volunteer")

REASONS = ("manual", "battery", "busy", "idle", "hours", "exclusive-app")
RESUME_CHARGE = 80.0  # percent: after a pause on battery, train again on mains from this charge
# The most CPU time the throttle lets a process bank while it waits (no burst after a pause).
CREDIT_SECONDS = 0.5
SLEEP_SLICE = 0.1  # the throttle's sleeps are cut in slices this long, so a pause is seen at once
IDLE_TIMEOUT = 2.0  # seconds for ioreg / xprintidle to answer


@dataclass(frozen=True)
class Battery:
    percent: float
    plugged: bool


@dataclass(frozen=True)
class Reading:
    """What the machine says at one moment."""

    battery: Battery | None = None
    idle_seconds: float | None = None  # None: the platform does not say
    others_cpu: float | None = None  # percent of the machine used by processes not this volunteer's
    running: frozenset[str] = frozenset()  # lower-case names of the running programs
    hour: int = 0  # local time


@dataclass
class Governor:
    """Decides, reading by reading, whether the volunteer may train, and if not, why."""

    prefs: Preferences
    manual: bool = False
    _battery_hold: bool = field(default=False, repr=False)

    def reasons(self, reading: Reading) -> list[str]:
        """Every rule that says pause now, in REASONS order (empty: train)."""
        prefs = self.prefs
        out = ["manual"] if self.manual else []
        if prefs.pause_on_battery and self._on_battery(reading.battery):
            out.append("battery")
        busy = prefs.pause_when_busy
        if busy is not None and reading.others_cpu is not None and reading.others_cpu > busy:
            out.append("busy")
        idle = prefs.idle_minutes
        if idle is not None and reading.idle_seconds is not None and reading.idle_seconds < idle * 60:
            out.append("idle")
        if not in_window(prefs.hours, reading.hour):
            out.append("hours")
        wanted = {app.lower() for app in prefs.exclusive_apps}
        if wanted & reading.running:
            out.append("exclusive-app")
        return out

    def _on_battery(self, battery: Battery | None) -> bool:
        """On battery, or back on mains but not yet charged to RESUME_CHARGE after a pause on battery."""
        if battery is None:
            self._battery_hold = False
            return False
        if not battery.plugged:
            self._battery_hold = True
        elif battery.percent >= RESUME_CHARGE:
            self._battery_hold = False
        return self._battery_hold


class Signals:
    """Reads the machine for a Governor; the CPU figure is over the time since the last reading."""

    def __init__(
        self,
        prefs: Preferences,
        own: Callable[[], Iterable[int]],
        battery_file: Path | None = None,
        idle_file: Path | None = None,
    ) -> None:
        self.prefs = prefs
        self._own = own  # the pids of this volunteer's processes (its pool's children come and go)
        self.battery_file = battery_file
        self.idle_file = idle_file
        self._cpus = psutil.cpu_count() or 1
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy s, our cpu s)
        self._said_no_idle = False

    def read(self) -> Reading:
        prefs = self.prefs
        return Reading(
            battery=self._battery() if prefs.pause_on_battery else None,
            idle_seconds=self._idle() if prefs.idle_minutes is not None else None,
            others_cpu=self._others_cpu() if prefs.pause_when_busy is not None else None,
            running=self._running() if prefs.exclusive_apps else frozenset(),
            hour=time.localtime().tm_hour,
        )

    def _battery(self) -> Battery | None:
        if self.battery_file is not None:
            return _battery_from_file(self.battery_file)
        try:
            found = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError):
            return None
        if found is None:
            return None
        return Battery(float(found.percent), bool(found.power_plugged))

    def _idle(self) -> float | None:
        if self.idle_file is not None:
            try:
                return float(self.idle_file.read_text().strip())
            except (OSError, ValueError):
                return None
        seconds = _platform_idle()
        if seconds is None and not self._said_no_idle:
            self._said_no_idle = True
            log.warning(
                "--idle-minutes: this platform does not say how long the user has been idle "
                "(macOS and Linux under X11 with xprintidle do); training as if idle"
            )
        return seconds

    def _others_cpu(self) -> float | None:
        """Percent of all cores' time that other processes used since the last call (None the first time)."""
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        ours = 0.0
        for pid in self._own():
            try:
                t = psutil.Process(pid).cpu_times()
                ours += t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        now = time.monotonic()
        last, self._last = self._last, (now, busy, ours)
        if last is None or now <= last[0]:
            return None
        others = (busy - last[1]) - max(0.0, ours - last[2])
        return max(0.0, 100.0 * others / ((now - last[0]) * self._cpus))

    def _running(self) -> frozenset[str]:
        names = set()
        for process in psutil.process_iter(["name", "cmdline"]):
            info = process.info
            if info.get("name"):
                names.add(str(info["name"]).lower())
            cmdline = info.get("cmdline") or []
            if cmdline:
                names.add(os.path.basename(str(cmdline[0])).lower())
        return frozenset(names)


class Throttle:
    """Duty-cycles a training loop so its process uses at most ``share`` of the machine's CPU time."""

    def __init__(self, share: float, cpus: int | None = None) -> None:
        self.rate = share * (cpus or psutil.cpu_count() or 1)  # cores' worth of CPU time per second
        self._debt = 0.0
        self._last = (time.process_time(), time.monotonic())
        self.throttled = False  # whether the last call slept

    def restart(self) -> None:
        """Forget the time before now (a new shard, the end of a pause)."""
        self._debt = 0.0
        self._last = (time.process_time(), time.monotonic())

    def pace(self, stop: Callable[[], bool]) -> None:
        """Sleep off the CPU time used since the last call beyond the share; return early when ``stop()``.

        The debt is all CPU time used over the rate, less all wall time passed, so
        CPU used *during* a sleep (torch's worker threads spin a while after each
        parallel region) is charged at the next call, not forgiven.
        """
        cpu, wall = time.process_time(), time.monotonic()
        self._debt += (cpu - self._last[0]) / self.rate - (wall - self._last[1])
        self._debt = max(self._debt, -CREDIT_SECONDS)
        self._last = (cpu, wall)
        self.throttled = self._debt > 0
        deadline = wall + self._debt
        while (left := deadline - time.monotonic()) > 0 and not stop():
            time.sleep(min(SLEEP_SLICE, left))


def _battery_from_file(path: Path) -> Battery | None:
    try:
        words = path.read_text().split()
    except OSError:
        return None
    if len(words) != 2 or words[1] not in ("plugged", "battery"):
        return None
    try:
        return Battery(float(words[0]), words[1] == "plugged")
    except ValueError:
        return None


def _platform_idle() -> float | None:
    """Seconds since the last keyboard or mouse input, where the platform says; else None."""
    try:
        if sys.platform == "darwin":
            command = ["ioreg", "-c", "IOHIDSystem", "-d", "4"]
            out = subprocess.run(command, capture_output=True, text=True, timeout=IDLE_TIMEOUT).stdout
            for line in out.splitlines():
                if "HIDIdleTime" in line:
                    return int(line.rsplit("=", 1)[1].strip()) / 1e9
            return None
        tool = shutil.which("xprintidle")
        if tool:
            out = subprocess.run([tool], capture_output=True, text=True, timeout=IDLE_TIMEOUT).stdout
            return int(out.strip()) / 1000.0
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return None
