"""Taking in one volunteer's upload: check it, keep a copy out of its reach, count it once.

Everything counted comes from the upload itself, which only the named
volunteer can write (its key prefix): a forged message naming someone else
finds no upload and is ignored. An upload counts only under the lease the
trusted side gave its volunteer for that shard, with the upload's token
(``coordinator.rounds.leases``): any other is deleted unread (``unleased``), and so
is one for a lease whose upload was accepted already (``repeat``). The order
of the checks is the order of cost: the round, shard and lease, the upload's
size (before a byte is downloaded), its header against the run's model and
codec (before anything is allocated), then the values. The upload is moved (a
server-side RENAMENX, which never replaces a copy already there) to a key no
volunteer can read or write before it is read, and what is accepted stays
there for the merge: the bytes merged are the bytes validated, and an
accepted upload is final.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from broker import blobs, keys
from coordinator.merging.reading import SketchCache
from coordinator.merging.verification import START_REPUTATION, cheap_to_sketch, sketch
from coordinator.rounds.leases import Lease, Leases
from coordinator.rounds.posting import shard_task
from coordinator.rounds.state import Fact
from coordinator.rounds.validation import check_delta, check_meta, delta_norm, printable
from coordinator.runs.context import RunContext, RunContexts
from coordinator.runs.slicing import check_slice
from coordinator.store import Store
from serialization import TensorDict, WireFormatError, loads

log = logging.getLogger("crowdtrain.intake")

# A shard whose upload was rejected is posted again, so another volunteer may train it,
# at most this many times per round: a volunteer spamming failures costs only that.
MAX_REOFFERS = 2


@dataclass(frozen=True)
class Verdict:
    """What became of one upload, and what the task should do next."""

    # accepted, replica, rejected, repeat, duplicate, identical, late, unknown, ignored, unleased
    # (deleted unread: no lease of its volunteer's names it), or wait (an asynchronous run's
    # buffer is being merged: ask again shortly)
    outcome: str
    due: bool = False  # the round's quorum is met: ask for aggregation
    retry: dict[str, Any] | None = None  # train_shard arguments to post the shard again
    queue: str = keys.TRAIN_QUEUE  # where to post it: the run's (broker.routing)
    counted_in: int | None = None  # the round it counted in, when not the message's (async buffers)


@dataclass(frozen=True)
class Upload:
    """One announced upload (``coordinator.rounds.announcements``).

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
    """Validates uploads for every run on one broker, a batch at a time."""

    def __init__(
        self,
        store: Store,
        contexts: RunContexts,
        leases: Leases | None = None,
        sketches: SketchCache | None = None,
    ) -> None:
        self.store = store
        self.contexts = contexts
        self.leases = leases if leases is not None else Leases(store, contexts)
        # each accepted copy's norm and sketch, for the merge in this process (none kept: budget 0)
        self.sketches = sketches if sketches is not None else SketchCache(0)

    def keep_sketch(
        self, context: RunContext, run: str, number: int, copy_key: str, norm: float, delta: TensorDict
    ) -> None:
        """Keep an accepted copy's norm and ``sketch`` for this process's merge, which judges by them.

        Only where sketching is cheap (``cheap_to_sketch``: a few ms): this loop
        also answers lease requests, which must not wait seconds behind a large
        model's sketch (the merge takes that one as before). Not in a sliced run,
        whose voices are judged slice by slice.
        """
        if not context.slices and cheap_to_sketch(delta):
            self.sketches.put(run, number, copy_key, norm, sketch(delta))

    def validate(self, run: str, number: int, shard: int, token: str, volunteer: str) -> Verdict:
        """Check one shard's upload and count it at most once."""
        return self.validate_many([Upload(run, number, shard, volunteer, token)])[0]

    def validate_many(self, uploads: Sequence[Upload]) -> list[Verdict]:
        """Check a batch of uploads, each counted at most once, in a few Redis round trips.

        One pipeline reads the rounds, one the sizes, one counts the bytes and
        moves and reads the uploads, one runs ``accept.lua`` for the good ones.
        Refusals, and validations cut short by a crash, take their own round
        trips: they are the rare case.
        """
        verdicts: list[Verdict] = [Verdict("ignored")] * len(uploads)
        infos = self.store.rounds.infos(sorted({(u.run, u.round) for u in uploads}))
        currents: dict[str, dict[str, Any] | None] = {}
        pending: list[tuple[int, _Pending]] = []
        for index, upload in enumerate(uploads):
            info = infos.get((upload.run, upload.round))
            if info is None or not 0 <= upload.shard < int(info["shards"]):
                log.warning(
                    "ignoring result for unknown round %s/%s shard %s", upload.run, upload.round, upload.shard
                )
                verdicts[index] = Verdict("unknown")
                continue
            if not (isinstance(upload.token, str) and keys.TOKEN.fullmatch(upload.token)):
                log.warning(
                    "ignoring %s round %d shard %d: malformed token from %s",
                    upload.run,
                    upload.round,
                    upload.shard,
                    upload.volunteer,
                )
                continue
            context = self.contexts[upload.run]

            def current(run: str = upload.run) -> dict[str, Any] | None:
                if run not in currents:
                    currents[run] = self.store.rounds.current(run)
                return currents[run]

            # where it counts: its own round (synchronous), or the buffer open now (asynchronous)
            placement = context.mode.place(upload.round, upload.shard, info, current)
            if placement is None:
                verdicts[index] = Verdict("wait")
                continue
            if placement.target is not None:
                upload = replace(upload, target=placement.target, slot=placement.slot)
            pending.append((index, _Pending(upload, context, info, placement.blocked)))
        pending = self._leased(pending, verdicts)
        answered: list[tuple[str, int, int, str]] = []
        for (index, entry), verdict in zip(pending, self._take(p for _, p in pending), strict=True):
            verdicts[index] = verdict
            upload = entry.upload
            if upload.target is not None and verdict.outcome not in ("wait", "ignored"):
                answered.append((upload.run, upload.round, upload.shard, verdict.outcome))
        self.store.rounds.answered_many(answered)
        return verdicts

    def _leased(
        self, pending: list[tuple[int, _Pending]], verdicts: list[Verdict]
    ) -> list[tuple[int, _Pending]]:
        """The entries whose upload names its volunteer's lease; the others are deleted unread.

        An upload under a lease that is ``done`` (its upload was accepted) is a
        ``repeat``: what was accepted is final, and the new bytes are never read.
        """
        holders = self.leases.holders([(e.upload.run, e.upload.round, e.upload.shard) for _, e in pending])
        kept: list[tuple[int, _Pending]] = []
        unread: list[str] = []
        for (index, entry), leases in zip(pending, holders, strict=True):
            upload = entry.upload
            lease = next(
                (x for x in leases if (x.volunteer, x.token) == (upload.volunteer, upload.token)), None
            )
            if lease is None or lease.state == "done":
                verdicts[index] = Verdict("unleased" if lease is None else "repeat")
                unread.append(upload.key)
                if lease is None:
                    log.warning(
                        "refused %s round %d shard %d from %s unread: no lease of its names it",
                        upload.run,
                        upload.round,
                        upload.shard,
                        upload.volunteer,
                    )
                continue
            entry.lease = lease
            kept.append((index, entry))
        self.store.delete_upload(*unread)
        return kept

    def _take(self, batch: Iterable[_Pending]) -> list[Verdict]:
        """Count each upload's bytes, refuse it (``blocked``, or over the bound) or move and judge it.

        Each entry's ``info`` is the round its shard was posted with: its base
        version is the one the delta must have been trained on.
        """
        entries = list(batch)
        verdicts: list[Verdict | None] = [None] * len(entries)
        # (declared, stored): the blob header's claim, and what Redis holds (broker.blobs)
        sizes = self.store.upload_sizes([e.upload.key for e in entries])
        moves: list[int] = []
        for index, (entry, (declared, stored)) in enumerate(zip(entries, sizes, strict=True)):
            upload, bound = entry.upload, entry.context.upload_bound
            if stored == 0:
                continue  # gone, never there, or moved by a validation cut short: see _resume
            if entry.blocked is None and (declared > bound or stored > blobs.storage_bound(bound)):
                entry.blocked = f"upload of {max(declared, stored)} bytes exceeds the bound {bound}"
            if entry.blocked is not None:
                verdicts[index] = self._refuse(upload, entry.info, entry.blocked, entry.lease)
            else:
                moves.append(index)
        present = [
            (e, declared or stored) for e, (declared, stored) in zip(entries, sizes, strict=True) if stored
        ]
        # No upload counts for more bytes than an honest one can have. Moved (server-side)
        # out of the volunteer's reach before a byte is read: what is checked is what the
        # merge will read. The upload's own key goes (kept as the accepted copy, or not at all).
        taken = self.store.take_uploads(
            [
                (entries[i].upload.key, entries[i].upload.copy_key, entries[i].context.upload_bound)
                for i in moves
            ],
            counts=[
                (e.upload.run, e.upload.counted_in, "uplink_bytes", min(size, e.context.upload_bound))
                for e, size in present
            ],
            discard=[e.upload.key for e, _ in present],
        )
        for index, blob in zip(moves, taken, strict=True):
            if isinstance(blob, blobs.BlobError):
                verdicts[index] = self._refuse(
                    entries[index].upload,
                    entries[index].info,
                    f"malformed upload: {blob}",
                    entries[index].lease,
                )
            else:
                entries[index].blob = blob
        resumed = [i for i, (_, stored) in enumerate(sizes) if stored == 0]
        copies = self.store.read_uploads(
            [entries[i].upload.copy_key for i in resumed], [entries[i].context.upload_bound for i in resumed]
        )
        for index, blob in zip(resumed, copies, strict=True):
            if isinstance(blob, blobs.BlobError):
                verdicts[index] = self._refuse(
                    entries[index].upload,
                    entries[index].info,
                    f"malformed upload: {blob}",
                    entries[index].lease,
                )
            else:
                verdicts[index] = self._resume(entries[index], blob)
        judged = [i for i in moves if entries[i].blob is not None] + [
            i for i in resumed if verdicts[i] is None
        ]
        for index, verdict in zip(judged, self._judge([entries[i] for i in judged]), strict=True):
            verdicts[index] = verdict
        return [v if v is not None else Verdict("ignored") for v in verdicts]

    def _resume(self, entry: _Pending, copy: bytearray | None) -> Verdict | None:
        """Finish a validation cut short after the move (its aggregator died; the upload was announced again).

        Only this class writes the copy, and only after the size check, so its
        bytes are the volunteer's as they were moved. Its uplink bytes were
        counted before the move. None: judge ``copy`` (kept on the entry).
        """
        upload = entry.upload
        if copy is None:
            log.warning(
                "ignoring %s round %d shard %d: no upload from %s",
                upload.run,
                upload.round,
                upload.shard,
                upload.volunteer,
            )
            return Verdict("ignored")
        if upload.copy_key in self.store.rounds.kept(upload.run, upload.counted_in, upload.field):
            return Verdict("repeat")  # judged and counted already; the merge reads this copy
        log.info(
            "resuming the validation of %s round %d shard %d from %s",
            upload.run,
            upload.round,
            upload.shard,
            upload.volunteer,
        )
        if upload.target is None and entry.info["status"] != "open":
            return self._refuse(upload, entry.info, "the round is closed", entry.lease)
        entry.blob = copy
        return None

    def _judge(self, entries: list[_Pending]) -> list[Verdict]:
        """Decode and check the values; accept the good uploads (one pipeline) as copies out of reach."""
        verdicts: list[Verdict | None] = [None] * len(entries)
        downlink: list[tuple[str, int, str, int]] = []
        good: list[int] = []
        accepts: list[tuple[str, int, int, str, str, str]] = []
        facts: list[Fact] = []
        for index, entry in enumerate(entries):
            upload, blob = entry.upload, entry.blob
            assert blob is not None  # only uploads read (or resumed) are judged
            entry.blob = None  # not kept once checked
            base = entry.lease.base_version if entry.lease is not None else int(entry.info["base_version"])
            reason, meta, norm, delta = _check(blob, entry.context, base, upload.shard)
            fetched = meta.get("downlink")
            if isinstance(fetched, int) and not isinstance(fetched, bool) and fetched > 0:
                # at most one model's bytes per shard: the rest is a volunteer's claim
                counted = min(fetched, entry.context.download_bound)
                downlink.append((upload.run, upload.counted_in, "downlink_bytes", counted))
            if reason is not None:
                verdicts[index] = self._refuse(upload, entry.info, reason, entry.lease)
                continue
            good.append(index)
            digest = hashlib.sha256(blob).hexdigest()
            accepts.append(
                (upload.run, upload.counted_in, upload.field, upload.copy_key, digest, upload.volunteer)
            )
            # decoded once, here: the merge screens by this norm and reads this meta
            facts.append(Fact(upload.run, upload.counted_in, upload.copy_key, norm, meta))
            if delta is not None:
                self.keep_sketch(entry.context, upload.run, upload.counted_in, upload.copy_key, norm, delta)
            del delta
        results = self.store.rounds.accept_many(accepts, counts=downlink, facts=facts)
        final = []  # an accepted upload's lease is done: nothing its volunteer does replaces it
        for index, (outcome, _) in zip(good, results, strict=True):
            lease = entries[index].lease
            if outcome in ("accepted", "replica", "repeat") and lease is not None:
                final.append((entries[index].upload.run, entries[index].upload.round, lease, "done"))
        self.leases.settle(final)
        for index, (outcome, due) in zip(good, results, strict=True):
            verdicts[index] = self._counted(entries[index], outcome, due)
        return [v if v is not None else Verdict("ignored") for v in verdicts]

    def _counted(self, entry: _Pending, outcome: str, due: bool) -> Verdict:
        """What ``accept.lua`` made of a good upload, and what follows from it."""
        upload, info = entry.upload, entry.info
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
        if outcome == "accepted" and self._spot_check(upload, entry.context):
            # a volunteer with a poor record: its shard is trained again by someone else and compared
            return Verdict(outcome, False, self._retry(upload, info), self._queue(upload))
        if outcome == "identical":
            return self._refuse(
                upload, info, "identical to an upload accepted for another shard", entry.lease
            )
        if outcome == "duplicate" and self.store.rounds.wants_replica(upload.run, upload.round, upload.shard):
            # the volunteer that trained the shard took its second posting too: post it again,
            # (bounded) so a different volunteer may check it
            return Verdict(outcome, due, self._retry(upload, info), self._queue(upload))
        return Verdict(outcome, due, counted_in=upload.target)

    def _refuse(
        self, upload: Upload, info: dict[str, Any], reason: str, lease: Lease | None = None
    ) -> Verdict:
        """Record the rejection once; post the shard again (bounded) so another volunteer can train it.

        Its ``lease`` ends, so that volunteer or another may lease the shard again.
        """
        if lease is not None:
            self.leases.settle([(upload.run, upload.round, lease, "release")])
        outcome = self.store.rounds.reject(
            upload.run, upload.counted_in, upload.field, upload.volunteer, reason, upload.token
        )
        self.store.delete_upload(upload.copy_key)  # nothing rejected is kept
        if outcome != "rejected":
            return Verdict(outcome)
        self.store.credit(upload.volunteer, run=upload.run, rejected=1)
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
        if not context.config.replicate:
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
        return shard_task(
            upload.run, upload.round, upload.shard, int(info["shards"]), int(info["base_version"])
        )

    def _queue(self, upload: Upload) -> str:
        return self.contexts[upload.run].queue


@dataclass
class _Pending:
    """One upload on its way through a batch: where it counts, why it may not, its bytes once read."""

    upload: Upload
    context: RunContext
    info: dict[str, Any]  # the round its shard was posted with
    blocked: str | None  # why it is refused unread, if it is
    blob: bytes | bytearray | None = None
    lease: Lease | None = None  # the lease it was uploaded under


def _check(
    blob: bytes | bytearray, context: RunContext, base_version: int, shard: int
) -> tuple[str | None, dict[str, Any], float, TensorDict | None]:
    """Why the upload cannot be merged (None if it can), its meta, its delta's norm (NaN if refused)
    and the delta (None if refused).

    In a sliced run its tensors must be exactly its shard's slice's.
    """
    nan = math.nan
    expected = context.expected_for(shard)
    try:
        delta, meta = loads(
            blob, limit=context.upload_bound, max_decoded=context.model_bytes, expect=expected
        )
    except WireFormatError as e:
        try:  # a volunteer's own failure report carries no tensors
            _, meta = loads(blob, limit=context.upload_bound, max_decoded=0)
        except WireFormatError:
            return f"malformed upload: {printable(str(e))}", {}, nan, None
        if "failure" in meta:
            return printable(str(meta["failure"])) or "failed", meta, nan, None
        return f"malformed upload: {printable(str(e))}", meta, nan, None
    if "failure" in meta:
        return printable(str(meta["failure"])) or "failed", meta, nan, None
    claimed = meta.get("base_version")
    if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed < base_version:
        # the lease says which version the job was given on: an older delta is a replay
        return f"stale: trained on version {claimed}, leased on version {base_version}", meta, nan, None
    reason = check_meta(meta, base_version=base_version, max_samples=context.max_samples)
    reason = reason or check_slice(meta, context, shard)
    reason = reason or check_delta(delta, context.reference_for(shard))
    if reason:
        return reason, meta, nan, None
    return None, meta, delta_norm(delta), delta
