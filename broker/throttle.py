"""Rate-limited log lines: a count per period instead of one line per bogus input.

Anyone with a volunteer's credentials can push junk as fast as Redis takes it
(announcements, queue messages, kombu bookkeeping), and each piece of junk is
worth a warning. ``Throttle`` is a ``logging.Filter``: each message template
(the record's format string) of a warning or worse passes ``burst`` times per
``period`` seconds on each logger; the rest are counted. The count comes out
as one line, ``N more like this in the last 10s: TEMPLATE``, when the period is
over: on the next record of that logger, or when a long-running loop calls
``flush_all`` (the aggregator's watcher, a volunteer's heartbeat).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

PERIOD = 10.0  # seconds
BURST = 5  # lines of one template per period
MAX_TEMPLATES = 1000  # templates are code, but the table stays bounded anyway
_SUMMARY = "crowdtrain_summary"  # set on the records this module writes
_throttles: list[Throttle] = []


@dataclass
class _Window:
    start: float
    level: int
    passed: int = 1
    suppressed: int = 0


class Throttle(logging.Filter):
    """Pass each warning template ``burst`` times per ``period``; count the rest (see the module)."""

    def __init__(
        self, period: float = PERIOD, burst: int = BURST, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.period = period
        self.burst = burst
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}  # (logger, template) -> its period

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        due = self._due(record.name)
        passes = record.levelno < logging.WARNING or self._count(record)
        for template, window in due:  # a period of this logger ended with lines held back
            _summarize(record.name, template, window, self.period)
        return passes

    def flush(self) -> None:
        """Write the count of every period that ended with lines held back."""
        for name in {name for name, _ in list(self._windows)}:
            for template, window in self._due(name):
                _summarize(name, template, window, self.period)

    def _count(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                if len(self._windows) >= MAX_TEMPLATES:
                    self._windows.clear()
                self._windows[key] = _Window(self.clock(), record.levelno)
                return True
            if window.passed < self.burst:
                window.passed += 1
                return True
            window.suppressed += 1
            return False

    def _due(self, name: str) -> list[tuple[str, _Window]]:
        """The windows of logger ``name`` whose period is over, taken out of the table."""
        now = self.clock()
        with self._lock:
            over = [k for k, w in self._windows.items() if k[0] == name and now - w.start >= self.period]
            return [(k[1], self._windows.pop(k)) for k in over]


def throttle(*names: str, period: float = PERIOD, burst: int = BURST) -> Throttle:
    """Install one Throttle on each named logger that has none; returns it."""
    made = Throttle(period, burst)
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Throttle) for f in logger.filters):
            logger.addFilter(made)
    _throttles.append(made)
    return made


def flush_all() -> None:
    """``flush`` every Throttle this process installed."""
    for made in list(_throttles):
        made.flush()


def _summarize(name: str, template: str, window: _Window, period: float) -> None:
    if window.suppressed:
        logging.getLogger(name).log(
            window.level,
            "%d more like this in the last %gs: %s",
            window.suppressed,
            period,
            template,
            extra={_SUMMARY: True},
        )
