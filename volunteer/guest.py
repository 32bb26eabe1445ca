"""The volunteer as a guest: watched by its main process, obeyed between training steps.

``Watch`` runs in the worker's main process: twice a second it reads the
machine (``etiquette.Signals``), asks the ``Governor`` whether to pause and
why, and posts the answer on the shared ``Board``; it also answers the
control socket (``volunteer pause|resume|status``). ``ShardGate`` runs in the
training process, between two steps of a shard: it writes the shard's progress
on the board, sleeps off ``--cpu-limit``, and while the board says pause it
saves the shard (``checkpoint``), stops, and keeps the lease for up to one
lease time before it gives the shard back. On resume it goes on from the
step it stopped at, if the shard is still its own (or leased to it again),
else the shard is dropped and nothing is uploaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volunteer.board import Board
from volunteer.checkpoint import Checkpoints, ShardKey, ShardState
from volunteer.etiquette import Governor, Signals, Throttle
from volunteer.preferences import Preferences
from volunteer.trainer import ShardDropped

log = logging.getLogger("crowdtrain.volunteer")

POLL = 0.5  # seconds between two readings of the machine
PAUSE_POLL = 0.1  # how often a paused trainer looks at the board


@dataclass
class Guest:
    """What a volunteer's processes share about its manners (made in ``volunteer start``, before the fork)."""

    prefs: Preferences
    board: Board
    home: Path  # CROWDTRAIN_HOME/volunteer/NAME
    trainers: int = 1  # processes training at once: --cpu-limit is split between them
    battery_file: Path | None = None
    idle_file: Path | None = None

    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.home / "shards")

    def share(self) -> float | None:
        """Each trainer's share of the machine's CPU time, or None without ``--cpu-limit``."""
        limit = self.prefs.cpu_limit
        return None if limit is None else limit / 100.0 / max(1, self.trainers)


@dataclass
class LeaseHold:
    """The lease a shard trains under: its token now, or None once given back."""

    token: str | None
    seconds: float

    def current(self) -> str | None:
        return self.token


class Progress:
    """One trainer's slot on the board: what it trains and how far it is."""

    def __init__(self, guest: Guest) -> None:
        self.board = guest.board
        self.slot = guest.board.claim()
        self.shards_done = int(self.board.read(self.slot).get("shards_done") or 0)
        self.doc: dict[str, Any] = {"state": "waiting", "shards_done": self.shards_done}
        self.board.write(self.slot, self.doc)

    def shard(self, run: str, number: int, shard: int, steps: int) -> None:
        self.doc = {
            "state": "training",
            "run": run,
            "round": number,
            "shard": shard,
            "step": 0,
            "steps": steps,
            "throttled": False,
            "shards_done": self.shards_done,
        }
        self.board.write(self.slot, self.doc)

    def update(self, **values: Any) -> None:
        self.doc.update(values)
        self.board.write(self.slot, self.doc)

    def done(self, trained: bool) -> None:
        self.shards_done += int(trained)
        self.doc = {"state": "waiting", "shards_done": self.shards_done}
        self.board.write(self.slot, self.doc)


class ShardGate:
    """The ``trainer.Gate`` of one shard: throttle, pause, checkpoint, give back, go on."""

    def __init__(
        self,
        guest: Guest,
        progress: Progress,
        key: ShardKey,
        lease: LeaseHold,
        release: Callable[[str], object],
        relet: Callable[[], dict[str, Any]],
    ) -> None:
        self.guest = guest
        self.progress = progress
        self.key = key
        self.lease = lease
        self._release = release  # release(token): give the lease back
        self._relet = relet  # ask for the shard's lease again after giving it back
        share = guest.share()
        self.throttle = Throttle(share) if share is not None and share < 1 else None
        self._written = 0.0

    def __call__(self, done: int, state: Callable[[], ShardState]) -> float:
        board = self.guest.board
        now = time.monotonic()
        if now - self._written > PAUSE_POLL or done == 0:  # the board is read by people, not per step
            throttled = self.throttle is not None and self.throttle.throttled
            self.progress.update(step=done, state="training", throttled=throttled)
            self._written = now
        if not board.paused and self.throttle is not None:
            self.throttle.pace(stop=lambda: board.paused)
        return self._pause(done, state) if board.paused else 0.0

    def _pause(self, done: int, state: Callable[[], ShardState]) -> float:
        """Hold training while the board says pause; the seconds it held."""
        began = time.monotonic()
        board = self.guest.board
        self.guest.checkpoints.save(self.key, state())
        self.progress.update(step=done, state="paused", throttled=False)
        log.info(
            "paused %s round %d shard %d at step %d (%s); checkpoint saved",
            self.key.run,
            self.key.round,
            self.key.shard,
            done,
            ", ".join(board.reasons()) or "manual",
        )
        while board.paused:
            time.sleep(PAUSE_POLL)
            token = self.lease.token
            if token is not None and time.monotonic() - began >= self.lease.seconds:
                self.lease.token = None  # not renewed from now on
                self._release(token)
                log.info(
                    "paused longer than the lease (%gs): gave %s round %d shard %d back",
                    self.lease.seconds,
                    self.key.run,
                    self.key.round,
                    self.key.shard,
                )
        if self.lease.token is None:
            answer = self._relet()
            if not answer.get("granted") or answer.get("base_version") not in (None, self.key.version):
                self.guest.checkpoints.delete(self.key)
                raise ShardDropped(f"resumed after giving the shard back: {answer.get('reason')}")
            self.lease.token = str(answer["token"])
        key = self.key
        log.info("resumed %s round %d shard %d at step %d", key.run, key.round, key.shard, done)
        self.progress.update(step=done, state="training")
        if self.throttle is not None:
            self.throttle.restart()
        return time.monotonic() - began


@dataclass
class Watch:
    """The main process's eye on the machine and ear on the control socket."""

    guest: Guest
    name: str
    own: Callable[[], list[int]]  # pids of this volunteer's processes
    credit: Callable[[], dict[str, Any]] = field(default=dict)
    on_change: Callable[[bool], None] = field(default=lambda paused: None)  # paused or not, when it flips
    governor: Governor = field(init=False)
    signals: Signals = field(init=False)
    reasons: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.governor = Governor(self.guest.prefs)
        self.signals = Signals(self.guest.prefs, self.own, self.guest.battery_file, self.guest.idle_file)

    def start(self) -> threading.Thread:
        self.check()
        thread = threading.Thread(target=self._loop, name="guest-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> list[str]:
        """Read the machine once and post the reasons to pause (if they changed)."""
        reading = self.signals.read()
        with self._lock:
            reasons = self.governor.reasons(reading)
            if reasons != self.reasons:
                was = bool(self.reasons)
                self.reasons = reasons
                self.guest.board.set_pause(reasons)
                if bool(reasons) != was:
                    log.info("%s: %s", "pausing" if reasons else "training again", ", ".join(reasons) or "")
                    self.on_change(bool(reasons))
        return reasons

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request: ``{"command": "pause" | "resume" | "status"}``."""
        command = request.get("command")
        if command in ("pause", "resume"):
            with self._lock:
                self.governor.manual = command == "pause"
            self.check()
        elif command != "status":
            return {"error": f"unknown command {command!r}: use pause, resume or status"}
        return self.status()

    def status(self) -> dict[str, Any]:
        """The ``volunteer status --json`` document of this volunteer."""
        slots = self.guest.board.progress()
        busy = [s for s in slots if s.get("state") in ("training", "paused")]
        current = busy[0] if busy else {}
        reasons = list(self.reasons)
        reason: str | None
        if reasons:
            state, reason = "paused", reasons[0]
        elif busy:
            state = "training"
            reason = "cpu-limit" if any(s.get("throttled") for s in busy) else None
        else:
            state, reason = "waiting", None
        credit = self.credit()
        return {
            "name": self.name,
            "state": state,
            "reason": reason,
            "reasons": reasons,
            "run": current.get("run"),
            "round": current.get("round"),
            "shard": current.get("shard"),
            "step": current.get("step"),
            "steps": current.get("steps"),
            "shards_done": sum(int(s.get("shards_done") or 0) for s in slots),
            "credit": {"accepted": _int(credit.get("accepted")), "samples": _int(credit.get("samples"))}
            if credit
            else None,
            "reputation": float(credit["reputation"]) if "reputation" in credit else None,
            "preferences": self.guest.prefs.describe(),
        }

    def _loop(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self.check()
            except Exception:  # a sensor that fails must not stop the watch
                log.exception("reading the machine failed")


def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0
