"""Announced uploads: the ``ct:announce`` list, drained in batches by the aggregator.

A volunteer stores its upload and, in the same transaction, appends the
upload's key to ``ct:announce``; its ACL user may RPUSH there and do nothing
else (not read, pop, trim or delete the list). That is the whole of what a
volunteer sends besides the upload: one Celery task per shard, no second
message. The aggregator's intake thread (``serve``) takes up to ``BATCH``
entries at a time and validates them together (``Intake.validate_many``: a
handful of Redis round trips per batch, not per upload).

Every entry is untrusted and only a hint of where to look. It must parse as an
upload key (``broker.keys.checked_upload``); whose upload it is, the key's
prefix says, and only that volunteer can write under it. Announcing another
volunteer's upload needs its token, which no other volunteer can read, and
would only have that upload validated as its own announcement does. An entry
longer than ``MAX_ENTRY`` bytes is dropped on the server unread
(``lua/drain.lua``), a malformed one with a (rate-limited) log line, and the same key twice
in a batch is validated once. The list holds at most ``MAX_BACKLOG`` entries.

Losing an entry loses no upload: the watcher (``coordinator.rounds.janitor``)
announces again every upload of an open round that waited a whole sweep, as
when the aggregator died holding a popped batch or the list overflowed.

The same loop answers lease requests (``coordinator.rounds.leases``) before each
batch of uploads, and about once a second offers again the shards of open
rounds that nobody holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from broker import keys
from broker.throttle import throttle
from coordinator.rounds.intake import Intake, Upload, Verdict
from coordinator.store import Store

log = logging.getLogger("crowdtrain.announcements")
# Every entry is a volunteer's to write, as fast as Redis takes them: warnings about bogus ones
# (here and in the intake that validates them) are a few lines and a count per period.
throttle(log.name, "crowdtrain.intake")

BATCH = 256  # entries taken, and validated together, at a time
MAX_ENTRY = 256  # bytes: an upload key is far shorter (two names of 64, two numbers, a token of 64)
MAX_BACKLOG = 100_000  # entries the list may hold: 25 MB at most
# After a batch the intake waits POLL_MIN before the next, so that uploads trickling in are
# validated a few at a time (a round's last upload waits that much more); with nothing taken it
# backs off to POLL_MAX, and after IDLE_AFTER s of nothing (between rounds, a run waiting for
# volunteers) on to IDLE_MAX. Blocking (BLPOP) would hand it whatever a volunteer pushed, however
# large, unread; a wake-up key of its own would be one more key every volunteer may write.
POLL_MIN = 0.005
POLL_MAX = 0.01
IDLE_AFTER = 1.0
# Idle, each poll (two drain.lua round trips) is about all the aggregator does: at POLL_MAX
# that was 4-5% of a core, at 0.1 s 1.2% (docs/BENCHMARKS.md section 30). At 0.1 s the intake
# polls about as often as the process's other loops together (joins every 0.2 s, the watcher
# every 0.5 s, the Celery worker's own), so a longer pause would save little more; and the first
# lease request or upload after a quiet second waits at most 0.1 s more, next to shards that
# train for seconds (a volunteer blocks on that answer before it trains). Rounds that follow
# each other within a second never back off that far.
IDLE_MAX = 0.1
ERROR_PAUSE = 1.0
# An upload to an asynchronous run that arrives while its buffer is merged is looked at again
# after WAIT_SECONDS, up to MAX_WAITS times (a merge takes seconds; the watcher sweeps up the rest).
WAIT_SECONDS = 0.5
MAX_WAITS = 600

# post(task name, keyword arguments, queue): how the intake asks for aggregations and re-offers shards
Post = Callable[[str, dict[str, Any], str], None]


class Inbox:
    """Takes announcements off the list, validates them a batch at a time, posts what follows."""

    def __init__(self, store: Store, intake: Intake, post: Post, backlog: int = MAX_BACKLOG) -> None:
        self.store = store
        self.intake = intake
        self.post = post
        self.backlog = backlog
        self._waiting: dict[Upload, tuple[float, int]] = {}  # upload -> (when to look again, attempts)

    def drain(self, now: float | None = None) -> int:
        """Validate one batch (and the waiting uploads now due); how many entries were taken."""
        now = time.monotonic() if now is None else now
        asked = self._lease()
        try:
            dropped, entries = self.store.take_announcements(BATCH, MAX_ENTRY, self.backlog)
        except redis.ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise
            # only a client with more rights than a volunteer's can put a non-list there
            log.warning("the announcement list %s was not a list: deleted", keys.announcements())
            self.store.redis.delete(keys.announcements())
            dropped, entries = 0, []
        if dropped:
            log.warning(
                "dropped %d announcements longer than %d bytes or beyond the list's %d",
                dropped,
                MAX_ENTRY,
                self.backlog,
            )
        uploads, malformed = parse(entries)
        if malformed:
            log.warning(
                "dropped %d malformed announcements (the first: %s)", len(malformed), _printable(malformed[0])
            )
        attempts = {upload: 0 for upload in uploads}
        for upload, (due, tries) in list(self._waiting.items()):
            if due <= now or upload in attempts:
                del self._waiting[upload]
                attempts[upload] = max(tries, attempts.get(upload, 0))
        if attempts:
            batch = list(attempts)
            self._follow(batch, self._validate(batch), attempts, now)
        return max(len(entries), asked)

    def _lease(self) -> int:
        """Answer a batch of lease requests and offer again what nobody holds; how many lists were read."""
        leases = self.intake.leases
        try:
            asked = leases.drain()
            leases.reoffer(self.post)
        except redis.ConnectionError:
            raise
        except Exception as e:  # one bad request must not stop the uploads
            log.exception("answering lease requests failed: %s", e)
            return 0
        return asked

    def _validate(self, batch: list[Upload]) -> list[Verdict]:
        """The batch's verdicts; if the batch fails, each upload on its own, so none sinks the others."""
        try:
            return self.intake.validate_many(batch)
        except redis.ConnectionError:
            raise  # the broker is gone: the watcher announces the uploads again later
        except Exception as e:
            log.warning("validating a batch of %d uploads failed (%s): one at a time", len(batch), e)
        verdicts = []
        for upload in batch:
            try:
                verdicts.extend(self.intake.validate_many([upload]))
            except redis.ConnectionError:
                raise
            except Exception as e:
                log.exception("validating %s failed: %s", upload.key, e)
                verdicts.append(Verdict("ignored"))
        return verdicts

    def _follow(
        self, batch: list[Upload], verdicts: list[Verdict], attempts: dict[Upload, int], now: float
    ) -> None:
        """Post each due round's aggregation once, the shards to offer again, and keep the waiting."""
        due: set[tuple[str, int]] = set()
        for upload, verdict in zip(batch, verdicts, strict=True):
            if verdict.outcome == "wait" and attempts[upload] < MAX_WAITS:
                self._waiting[upload] = (now + WAIT_SECONDS, attempts[upload] + 1)
            if verdict.due:  # the round it counted in: in an asynchronous run, the open buffer
                due.add((upload.run, upload.round if verdict.counted_in is None else verdict.counted_in))
            if verdict.retry is not None:  # a failed shard goes back on the queue for someone else
                self.post("train_shard", verdict.retry, verdict.queue)
        for run, number in sorted(due):
            self.post("aggregate_round", {"run": run, "round": number}, keys.AGGREGATE_QUEUE)


def parse(entries: Sequence[bytes]) -> tuple[list[Upload], list[bytes]]:
    """The uploads the entries name, each once, and the entries that name none (malformed)."""
    uploads: dict[Upload, None] = {}
    malformed: list[bytes] = []
    for raw in entries:
        try:
            parsed = keys.checked_upload(raw.decode("ascii"))
        except UnicodeDecodeError:
            parsed = None
        if parsed is None:
            malformed.append(raw)
            continue
        volunteer, run, number, shard, token = parsed
        uploads[Upload(run, number, shard, volunteer, token)] = None
    return list(uploads), malformed


def serve(inbox: Inbox, stop: threading.Event) -> None:
    """Drain the list until ``stop`` is set: at once while batches come full, backing off while idle.

    The backoff counts the pauses it waited, not the clock: a second of polls that took nothing
    (``IDLE_AFTER``) lets the pause grow past ``POLL_MAX`` to ``IDLE_MAX``; anything taken brings
    it back to ``POLL_MIN``.
    """
    pause = POLL_MIN
    quiet = 0.0  # seconds waited since something was last taken
    while not stop.is_set():
        try:
            taken = inbox.drain()
        except Exception as e:  # a broker outage must not kill the intake
            log.warning("intake: %s (retrying)", e)
            taken, pause = 0, ERROR_PAUSE
        if taken:
            pause, quiet = POLL_MIN, 0.0
            if taken >= BATCH:
                continue  # more are waiting
        stop.wait(pause)
        quiet += pause
        pause = min(POLL_MAX if quiet < IDLE_AFTER else IDLE_MAX, pause * 2)


def _printable(raw: bytes) -> str:
    """At most 80 bytes of an entry, escaped: its text comes from whoever pushed it."""
    return repr(raw[:80])
