"""Keeping something alive while a block runs: a lease, a claim.

Both sides hold time-bounded rights in Redis (a volunteer its shard's lease,
an aggregator its claim on a round) and renew them from a background thread
while the work goes on, so one mechanism serves both.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def renewing(period: float, renew: Callable[[], bool], name: str) -> Iterator[None]:
    """Call ``renew`` every ``period`` seconds until the block ends, or until it returns False.

    ``renew`` handles its own errors: a blip is logged and tried again at the
    next period, which the right's own duration is sized to cover.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period):
            if not renew():
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
