"""Taking in one volunteer's upload: check it, keep a copy out of its reach, count it once.

Everything counted comes from the upload itself, which only the named
volunteer can write (its key prefix): a forged message naming someone else
finds no upload and is ignored. The order of the checks is the order of cost:
the round and shard, the upload's size (before a byte is downloaded), its
header against the run's model and codec (before anything is allocated), then
the values. The upload is moved (a server-side RENAME) to a key no volunteer
can write before it is read, and what is accepted stays there for the merge:
the bytes merged are the bytes validated.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

from broker import blobs, keys
from coordinator.asynchronous import is_async, max_staleness, slot
from coordinator.context import RunContext, RunContexts
from coordinator.rounds import shard_task
from coordinator.store import Store
from coordinator.validation import check_delta, check_meta, printable
from coordinator.verification import START_REPUTATION
from serialization import WireFormatError, loads

log = logging.getLogger("crowdtrain.intake")

_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")
# A shard whose upload was rejected is posted again, so another volunteer may train it,
# at most this many times per round: a volunteer spamming failures costs only that.
MAX_REOFFERS = 2


@dataclass(frozen=True)
class Verdict:
    """What became of one upload, and what the task should do next."""

    # accepted, replica, rejected, repeat, duplicate, identical, late, unknown, ignored, or wait
    # (an asynchronous run's buffer is being merged: ask again shortly)
    outcome: str
    due: bool = False  # the round's quorum is met: ask for aggregation
    retry: dict[str, Any] | None = None  # train_shard arguments to post the shard again
    queue: str = keys.TRAIN_QUEUE  # where to post it: the run's (broker.routing)
    counted_in: int | None = None  # the round it counted in, when not the message's (async buffers)


@dataclass(frozen=True)
class Upload:
    """One upload named by a ``validate_delta`` message.

    It counts in the round it was posted with, except in an asynchronous run,
    where it counts in the buffer open when it arrives (``counted_in``) under
    its slot there (``field``).
    """

    run: str
    round: int
    shard: int
    volunteer: str
    token: str
    target: int | None = None
    slot: int | None = None

    @property
    def counted_in(self) -> int:
        return self.round if self.target is None else self.target

    @property
    def field(self) -> int:
        return self.shard if self.slot is None else self.slot

    @property
    def key(self) -> str:
        return keys.upload(self.volunteer, self.run, self.round, self.shard, self.token)

    @property
    def copy_key(self) -> str:
        return keys.accepted_upload(self.run, self.round, self.volunteer, self.shard, self.token)


class Intake:
    """Validates uploads for every run on one broker."""

    def __init__(self, store: Store, contexts: RunContexts) -> None:
        self.store = store
        self.contexts = contexts

    def validate(self, run: str, number: int, shard: int, token: str, volunteer: str) -> Verdict:
        """Check one shard's upload and count it at most once."""
        info = self.store.rounds.info(run, number)
        if info is None or not 0 <= shard < int(info["shards"]):
            log.warning("ignoring result for unknown round %s/%s shard %s", run, number, shard)
            return Verdict("unknown")
        if not (isinstance(token, str) and _TOKEN.match(token)):
            log.warning(
                "ignoring %s round %d shard %d: malformed token from %s", run, number, shard, volunteer
            )
            return Verdict("ignored")
        upload = Upload(run, number, shard, volunteer, token)
        context = self.contexts[run]
        if is_async(context.config):
            verdict = self._validate_buffered(upload, context, info)
            if verdict.outcome not in ("wait", "ignored"):
                self.store.rounds.answered(run, number, shard, verdict.outcome)
            return verdict
        blocked = "the round is closed" if info["status"] != "open" else None
        return self._take(upload, context, info, blocked)

    def _take(
        self, upload: Upload, context: RunContext, info: dict[str, Any], blocked: str | None
    ) -> Verdict:
        """Count the upload's bytes, refuse it (``blocked``, or over the bound) or move and judge it.

        ``info`` is the round the shard was posted with: its base version is
        the one the delta must have been trained on.
        """
        declared, stored = self.store.upload_size(upload.key)
        if stored == 0:
            return self._resume(upload, context, info)
        bound = context.upload_bound
        # No upload counts for more bytes than an honest one can have.
        self.store.rounds.add_bytes(
            upload.run, upload.counted_in, "uplink_bytes", min(declared or stored, bound)
        )
        try:
            if blocked is not None:
                return self._refuse(upload, info, blocked)
            if declared > bound or stored > blobs.storage_bound(bound):
                reason = f"upload of {max(declared, stored)} bytes exceeds the bound {bound}"
                return self._refuse(upload, info, reason)
            # Moved (server-side) out of the volunteer's reach before a byte is read:
            # what is checked below is what the merge will read.
            try:
                blob = self.store.take_upload(upload.key, upload.copy_key, bound)
            except blobs.BlobError as e:
                return self._refuse(upload, info, f"malformed upload: {e}")
            if blob is None:
                return Verdict("ignored")
            return self._judge(upload, context, info, blob)
        finally:
            self.store.delete_upload(upload.key)  # kept as the accepted copy, or not at all

    def _validate_buffered(self, upload: Upload, context: RunContext, posted: dict[str, Any]) -> Verdict:
        """An asynchronous run's upload: counted in the buffer open now, if not too stale.

        ``posted`` is the round the job was posted with: its version is the one
        the delta must have been trained on. While a buffer is being merged
        there is none open, and the upload waits (``wait``: the task asks again).
        """
        current = self.store.rounds.current(upload.run)
        if current is None or current["status"] != "open":
            return Verdict("wait")
        staleness = int(current["base_version"]) - int(posted["base_version"])
        upload = replace(upload, target=int(current["round"]), slot=slot(upload.round, upload.shard))
        limit = max_staleness(context.config)
        blocked = None
        if staleness > limit:
            blocked = (
                f"stale: trained on version {posted['base_version']}, {staleness} versions behind "
                f"the current {current['base_version']} (at most {limit})"
            )
        return self._take(upload, context, posted, blocked)

    def _resume(self, upload: Upload, context: RunContext, info: dict[str, Any]) -> Verdict:
        """Finish a validation cut short after the move (its aggregator died; the message came back).

        Only this class writes the copy, and only after the size check, so its
        bytes are the volunteer's as they were moved. Its uplink bytes were
        counted before the move.
        """
        kept = (self.store.rounds.accepted_uploads, self.store.rounds.replicas)
        if any(copies(upload.run, upload.counted_in).get(upload.field) == upload.copy_key for copies in kept):
            return Verdict("repeat")  # judged and counted already; the merge reads this copy
        try:
            blob = self.store.get_upload(upload.copy_key, context.upload_bound)
        except blobs.BlobError as e:
            return self._refuse(upload, info, f"malformed upload: {e}")
        if blob is None:
            log.warning(
                "ignoring %s round %d shard %d: no upload from %s",
                upload.run,
                upload.round,
                upload.shard,
                upload.volunteer,
            )
            return Verdict("ignored")
        log.info(
            "resuming the validation of %s round %d shard %d from %s",
            upload.run,
            upload.round,
            upload.shard,
            upload.volunteer,
        )
        if upload.target is None and info["status"] != "open":
            return self._refuse(upload, info, "the round is closed")
        return self._judge(upload, context, info, blob)

    def _judge(
        self, upload: Upload, context: RunContext, info: dict[str, Any], blob: bytes | bytearray
    ) -> Verdict:
        """Decode and check the values; accept a good upload as a copy out of the volunteer's reach."""
        reason, meta = _check(blob, context, int(info["base_version"]))
        self._count_downlink(upload, context, meta)
        if reason is not None:
            return self._refuse(upload, info, reason)
        digest = hashlib.sha256(blob).hexdigest()
        outcome, due = self.store.rounds.accept(
            upload.run, upload.counted_in, upload.field, upload.copy_key, digest, upload.volunteer
        )
        if outcome in ("accepted", "replica"):
            log.info(
                "%s %s round %d shard %d from %s",
                "accepted" if outcome == "accepted" else "kept as the replica of",
                upload.run,
                upload.round,
                upload.shard,
                upload.volunteer,
            )
        elif outcome != "repeat":  # the same copy counted before: keep it
            self.store.delete_upload(upload.copy_key)
        if outcome == "accepted" and self._spot_check(upload, context):
            # a volunteer with a poor record: its shard is trained again by someone else and compared
            return Verdict(outcome, False, self._retry(upload, info), self._queue(upload))
        if outcome == "identical":
            return self._refuse(upload, info, "identical to an upload accepted for another shard")
        if outcome == "duplicate" and self.store.rounds.wants_replica(upload.run, upload.round, upload.shard):
            # the volunteer that trained the shard took its second posting too: post it again,
            # (bounded) so a different volunteer may check it
            return Verdict(outcome, due, self._retry(upload, info), self._queue(upload))
        return Verdict(outcome, due, counted_in=upload.target)

    def _count_downlink(self, upload: Upload, context: RunContext, meta: dict[str, Any]) -> None:
        downlink = meta.get("downlink")
        if isinstance(downlink, int) and not isinstance(downlink, bool) and downlink > 0:
            # at most one model's bytes per shard: the rest is a volunteer's claim
            counted = min(downlink, context.download_bound)
            self.store.rounds.add_bytes(upload.run, upload.counted_in, "downlink_bytes", counted)

    def _refuse(self, upload: Upload, info: dict[str, Any], reason: str) -> Verdict:
        """Record the rejection once; post the shard again (bounded) so another volunteer can train it."""
        outcome = self.store.rounds.reject(
            upload.run, upload.counted_in, upload.field, upload.volunteer, reason, upload.token
        )
        self.store.delete_upload(upload.copy_key)  # nothing rejected is kept
        if outcome != "rejected":
            return Verdict(outcome)
        self.store.credit(upload.volunteer, rejected=1)
        log.warning(
            "rejected %s round %d shard %d from %s: %s",
            upload.run,
            upload.round,
            upload.shard,
            upload.volunteer,
            reason,
        )
        return Verdict("rejected", retry=self._retry(upload, info), queue=self._queue(upload))

    def _spot_check(self, upload: Upload, context: RunContext) -> bool:
        """Adaptive replication (``--replicate``): check a low-reputation volunteer's shard again.

        Beyond the fixed fraction posted twice, a volunteer whose reputation is
        below the start is checked with probability (start - reputation) /
        start: always at 0, never once it has earned the start back. The draw
        is unpredictable (``secrets``), so it cannot be gamed.
        """
        if not context.config.get("replicate"):
            return False
        reputation = self.store.reputations([upload.volunteer])[upload.volunteer]
        if reputation is None or reputation >= START_REPUTATION:
            return False
        chance = (START_REPUTATION - reputation) / START_REPUTATION
        if secrets.randbelow(1_000_000) >= chance * 1_000_000:
            return False
        return self.store.rounds.check_again(upload.run, upload.round, upload.shard)

    def _retry(self, upload: Upload, info: dict[str, Any]) -> dict[str, Any] | None:
        """The shard's task to post again, or None once it was posted again MAX_REOFFERS times.

        Never in an asynchronous run, whose coordinator keeps its jobs topped up.
        """
        if upload.target is not None or not self.store.rounds.reoffer(
            upload.run, upload.round, upload.shard, MAX_REOFFERS
        ):
            return None
        base = int(info["base_version"])
        return shard_task(upload.run, upload.round, upload.shard, int(info["shards"]), base)

    def _queue(self, upload: Upload) -> str:
        return self.contexts[upload.run].queue


def _check(
    blob: bytes | bytearray, context: RunContext, base_version: int
) -> tuple[str | None, dict[str, Any]]:
    """Why the upload cannot be merged (None if it can), and its meta."""
    try:
        delta, meta = loads(
            blob, limit=context.upload_bound, max_decoded=context.model_bytes, expect=context.expected
        )
    except WireFormatError as e:
        try:  # a volunteer's own failure report carries no tensors
            _, meta = loads(blob, limit=context.upload_bound, max_decoded=0)
        except WireFormatError:
            return f"malformed upload: {printable(str(e))}", {}
        if "failure" in meta:
            return printable(str(meta["failure"])) or "failed", meta
        return f"malformed upload: {printable(str(e))}", meta
    if "failure" in meta:
        return printable(str(meta["failure"])) or "failed", meta
    reason = check_meta(meta, base_version=base_version, max_samples=context.max_samples)
    return reason or check_delta(delta, context.reference), meta
