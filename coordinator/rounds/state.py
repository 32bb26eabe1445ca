"""The round state machine, kept in Redis: open -> aggregating -> done | failed.

Each transition is one Lua script under ``coordinator/lua/``, so it is atomic
on the server however many coordinators, aggregators and volunteers race, and
each failure comes back as a distinct result (written in the script's header):

| transition | script | results |
| --- | --- | --- |
| open a round | ``open.lua`` | opened, round-open, raced, unknown-run |
| count an upload | ``accept.lua`` | accepted, replica, repeat, duplicate, identical, late |
| refuse an upload | ``reject.lua`` | rejected, repeat, duplicate, late |
| take it to merge | ``claim.lua`` | claimed, not-due, held, closed |
| keep it | ``renew.lua`` | renewed, lost |
| end it | ``commit.lua`` | done, failed, lost, stale-base |
| end it by hand | ``abort.lua`` | aborted, not-active |
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgpack
import redis

from broker import keys
from broker.errors import UnknownRun
from coordinator.errors import RoundOpen

# An aggregator holds a round this long without renewing its claim; after that
# (it crashed) another aggregator may take the round over.
CLAIM_LEASE = 10.0
OPEN_ATTEMPTS = 5
ACTIVE = ("open", "aggregating")


@dataclass(frozen=True)
class Fact:
    """What the intake learned of an accepted copy when it decoded it: its norm and its meta."""

    run: str
    round: int  # the round (or asynchronous buffer) it counted in
    copy_key: str
    norm: float
    meta: dict[str, Any]


INCLUDE = "--#include "


class RoundState:
    """The rounds of every run on one Redis server."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._scripts = {
            name: client.register_script(lua_source(name))
            for name in ("open", "accept", "reject", "claim", "renew", "commit", "abort", "due_rounds")
        }

    # --- transitions ---------------------------------------------------------
    def open(self, run: str, shards: int, quorum: int, deadline: float) -> dict[str, Any]:
        """Number and record a new round on the current version; RoundOpen if one is in progress."""
        for _ in range(OPEN_ATTEMPTS):
            current = self.count(run)
            now = time.time()
            result = self._scripts["open"](
                keys=[
                    keys.run_rounds(run),
                    keys.run_version(run),
                    keys.round_(run, current),
                    keys.round_(run, current + 1),
                    keys.deadlines(),
                ],
                args=[current, shards, quorum, now, now + deadline, keys.deadline_member(run, current + 1)],
            )
            outcome = _text(result[0])
            if outcome == "opened":
                return self.info(run, int(result[1])) or {}
            if outcome == "round-open":
                raise RoundOpen(
                    f"run {run!r} has round {int(result[1])} in progress; "
                    "wait for it (post-round --wait) or let its deadline pass"
                )
            if outcome == "unknown-run":
                raise UnknownRun(f"unknown run {run!r}: create it with 'coordinator init --run {run}'")
        raise RoundOpen(f"run {run!r}: another coordinator kept opening rounds at the same time")

    def accept(
        self, run: str, number: int, shard: int, copy_key: str, digest: str, volunteer: str
    ) -> tuple[str, bool]:
        """Count a validated upload once: (outcome, due); the outcomes are in ``accept.lua``."""
        return self.accept_many([(run, number, shard, copy_key, digest, volunteer)])[0]

    def accept_many(
        self,
        uploads: Sequence[tuple[str, int, int, str, str, str]],
        counts: Sequence[tuple[str, int, str, int]] = (),
        facts: Sequence[Fact] = (),
    ) -> list[tuple[str, bool]]:
        """``accept`` for each (run, round, shard, copy key, digest, volunteer), in one pipeline.

        The ``counts`` (run, round, field, count) are added, and the ``facts``
        recorded, in the same round trip.
        """
        if not uploads and not counts:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for run, number, field, count in counts:
            pipe.hincrby(keys.round_(run, number), field, count)
        for fact in facts:
            record = msgpack.packb({"norm": fact.norm, "meta": fact.meta})
            pipe.hset(keys.round_facts(fact.run, fact.round), fact.copy_key, record)
            pipe.expire(keys.round_facts(fact.run, fact.round), keys.ROUND_TTL)
        skip = len(counts) + 2 * len(facts)
        for run, number, shard, copy_key, digest, volunteer in uploads:
            self._scripts["accept"](
                keys=[
                    keys.round_(run, number),
                    keys.round_accepted(run, number),
                    keys.round_digests(run, number),
                    keys.round_replicated(run, number),
                    keys.round_replicas(run, number),
                    keys.run_taken(run),
                ],
                args=[shard, copy_key, digest, volunteer, keys.ROUND_TTL],
                client=pipe,
            )
        replies = pipe.execute()[skip:]
        return [(_text(outcome), bool(due)) for outcome, due in replies]

    def facts(self, run: str, number: int, copies: Sequence[str]) -> dict[str, Fact]:
        """What the intake recorded of each accepted copy (``accept_many``); unrecorded ones are left out."""
        if not copies:
            return {}
        found: dict[str, Fact] = {}
        for copy_key, raw in zip(copies, self.redis.hmget(keys.round_facts(run, number), list(copies))):
            if raw is None:
                continue
            record = msgpack.unpackb(raw)
            found[copy_key] = Fact(run, number, copy_key, float(record["norm"]), dict(record["meta"]))
        return found

    def reject(self, run: str, number: int, shard: int, volunteer: str, reason: str, upload: str = "") -> str:
        """Record why an upload was refused: rejected | repeat | duplicate | late."""
        entry = json.dumps({"shard": shard, "volunteer": volunteer, "reason": reason})
        return _text(
            self._scripts["reject"](
                keys=[
                    keys.round_(run, number),
                    keys.round_rejections(run, number),
                    keys.round_accepted(run, number),
                ],
                args=[shard, entry, f"{shard}|{volunteer}|{upload}"],
            )
        )

    def reject_claimed(self, run: str, number: int, shard: int, volunteer: str, reason: str) -> None:
        """Record a rejection decided while merging (the round is no longer open)."""
        entry = json.dumps({"shard": shard, "volunteer": volunteer, "reason": reason})
        self.redis.hset(keys.round_rejections(run, number), f"{shard}|{volunteer}|aggregation", entry)

    def claim(self, run: str, number: int, owner: str, lease: float = CLAIM_LEASE) -> str:
        """Take the round for aggregation: claimed | not-due | held | closed."""
        return _text(
            self._scripts["claim"](keys=[keys.round_(run, number)], args=[owner, time.time(), lease])
        )

    def renew(self, run: str, number: int, owner: str, lease: float = CLAIM_LEASE) -> str:
        """Extend our claim while a long aggregation works: renewed | lost."""
        return _text(
            self._scripts["renew"](keys=[keys.round_(run, number)], args=[owner, time.time() + lease])
        )

    def commit(
        self,
        run: str,
        number: int,
        owner: str,
        base_version: int,
        summary: dict[str, Any],
        staged_key: str | None,
        reason: str = "",
    ) -> str:
        """Publish the staged model (and strategy state, update, residual) as base+1, or record a failure.

        Returns done | failed | lost | stale-base; the round's bookkeeping starts
        to expire once it has ended.
        """
        status = "done" if staged_key else "failed"
        result = _text(
            self._scripts["commit"](
                keys=[
                    keys.run_version(run),
                    staged_key or keys.staged_model(run, base_version + 1, owner),
                    keys.model(run, base_version + 1),
                    keys.round_(run, number),
                    keys.strategy(run),
                    keys.deadlines(),
                    keys.staged_update(run, base_version + 1, owner),
                    keys.update(run, base_version + 1),
                    keys.staged_residual(run, owner),
                    keys.downlink_residual(run),
                    keys.staged_strategy(run, owner),
                ],
                args=[
                    base_version,
                    owner,
                    json.dumps(summary),
                    "",
                    keys.deadline_member(run, number),
                    status,
                    reason,
                ],
            )
        )
        if result != "lost":
            self._expire(run, number)
        return result

    def abort(self, run: str, number: int, reason: str = "aborted") -> str:
        """Fail an open or aggregating round by hand: aborted | not-active."""
        result = _text(
            self._scripts["abort"](
                keys=[keys.round_(run, number), keys.deadlines()],
                args=[keys.deadline_member(run, number), reason],
            )
        )
        if result == "aborted":
            self._expire(run, number)
        return result

    # --- reads ---------------------------------------------------------------
    def count(self, run: str) -> int:
        """Number of the latest round (0 before the first)."""
        return int(self.redis.get(keys.run_rounds(run)) or 0)

    def info(self, run: str, number: int) -> dict[str, Any] | None:
        """The round's hash as numbers and text, with ``round`` added; None if unknown."""
        raw = self.redis.hgetall(keys.round_(run, number))
        if not raw:
            return None
        info: dict[str, Any] = {"round": number}
        for key, value in raw.items():
            info[key.decode()] = number_or_text(value.decode())
        return info

    def infos(self, rounds: Sequence[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
        """``info`` of each (run, round) that exists, in one round trip."""
        if not rounds:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for run, number in rounds:
            pipe.hgetall(keys.round_(run, number))
        found = {}
        for (run, number), raw in zip(rounds, pipe.execute(), strict=True):
            if raw:
                found[(run, number)] = {"round": number} | {
                    key.decode(): number_or_text(value.decode()) for key, value in raw.items()
                }
        return found

    def current(self, run: str) -> dict[str, Any] | None:
        number = self.count(run)
        return self.info(run, number) if number else None

    def status(self, run: str, number: int) -> str | None:
        raw = self.redis.hget(keys.round_(run, number), "status")
        return raw.decode() if raw is not None else None

    def add_bytes(self, run: str, number: int, field: str, count: int) -> None:
        self.redis.hincrby(keys.round_(run, number), field, count)

    def replicate(self, run: str, number: int, shards: list[int]) -> None:
        """Mark shards of an open round as posted twice: it is due only once their replicas are in."""
        if not shards:
            return
        pipe = self.redis.pipeline()
        pipe.sadd(keys.round_replicated(run, number), *shards)
        pipe.hset(keys.round_(run, number), "replicas_expected", len(shards))
        pipe.execute()

    def check_again(self, run: str, number: int, shard: int) -> bool:
        """Mark one more shard of an open round for a replica; False if it was marked already."""
        if not self.redis.sadd(keys.round_replicated(run, number), shard):
            return False
        self.redis.hincrby(keys.round_(run, number), "replicas_expected", 1)
        return True

    def wants_replica(self, run: str, number: int, shard: int) -> bool:
        """True while a replicated shard of the round has no replica yet."""
        pipe = self.redis.pipeline()
        pipe.sismember(keys.round_replicated(run, number), shard)
        pipe.hexists(keys.round_replicas(run, number), shard)
        replicated, has_one = pipe.execute()
        return bool(replicated) and not has_one

    def replicas(self, run: str, number: int) -> dict[int, str]:
        """Replicated shard -> key of the second volunteer's accepted copy."""
        raw = self.redis.hgetall(keys.round_replicas(run, number))
        return {int(k): v.decode() for k, v in raw.items()}

    def kept(self, run: str, number: int, shard: int) -> set[str]:
        """Keys of the copies a round counts for one shard (its accepted upload, its replica)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.round_accepted(run, number), shard)
        pipe.hget(keys.round_replicas(run, number), shard)
        return {key.decode() for key in pipe.execute() if key is not None}

    def accepted_uploads(self, run: str, number: int) -> dict[int, str]:
        raw = self.redis.hgetall(keys.round_accepted(run, number))
        return {int(k): v.decode() for k, v in raw.items()}

    def rejections(self, run: str, number: int) -> list[dict[str, Any]]:
        raw = self.redis.hvals(keys.round_rejections(run, number))
        return sorted((json.loads(x) for x in raw), key=lambda r: (r["shard"], r["volunteer"]))

    def due(self, now: float | None = None) -> dict[tuple[str, int], str]:
        """Unfinished rounds an aggregator should take now, each with why (``due.lua``, as ``claim.lua``).

        Why: ``count`` (its quorum and replicas are in: the upload that
        counted last was announced with it), ``deadline``, or ``abandoned``
        (its aggregator's claim ran out).
        """
        now = time.time() if now is None else now
        members = [m.decode() for m in self.redis.zrange(keys.deadlines(), 0, -1)]
        rounds = [keys.parse_deadline_member(m) for m in members]
        if not rounds:
            return {}
        whys = self._scripts["due_rounds"](keys=[keys.round_(run, n) for run, n in rounds], args=[now])
        found = {key: _text(why) for key, why in zip(rounds, whys)}
        return {key: why for key, why in found.items() if why in ("count", "deadline", "abandoned")}

    def reoffer(self, run: str, number: int, shard: int, limit: int) -> bool:
        """Count one more posting of a failed shard; False once it was posted again ``limit`` times."""
        count = int(self.redis.hincrby(keys.round_reoffers(run, number), shard, 1))
        return count <= limit

    # --- asynchronous runs: jobs posted and answered (coordinator.rounds.asynchronous) -----
    def add_jobs(self, run: str, number: int, count: int) -> int:
        """Count ``count`` more jobs posted with round ``number``; the round's job total after them."""
        pipe = self.redis.pipeline()
        pipe.hincrby(keys.round_(run, number), "shards", count)
        pipe.hincrby(keys.run_jobs(run), "posted", count)
        total, _ = pipe.execute()
        return int(total)

    def answered(self, run: str, number: int, shard: int, outcome: str) -> None:
        """Note that job ``shard`` of round ``number`` was answered (once: repeats change nothing)."""
        self.answered_many([(run, number, shard, outcome)])

    def answered_many(self, jobs: Sequence[tuple[str, int, int, str]]) -> None:
        """``answered`` for each (run, round, job, outcome), in one round trip."""
        if not jobs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for run, number, shard, outcome in jobs:
            pipe.hsetnx(keys.run_finished(run), f"{number}:{shard}", outcome)
        for run in {run for run, _, _, _ in jobs}:
            pipe.expire(keys.run_finished(run), keys.ROUND_TTL)
        pipe.execute()

    def outstanding(self, run: str) -> int:
        """Jobs of an asynchronous run posted and not yet answered."""
        pipe = self.redis.pipeline()
        pipe.hget(keys.run_jobs(run), "posted")
        pipe.hlen(keys.run_finished(run))
        posted, finished = pipe.execute()
        return max(0, int(posted or 0) - int(finished))

    def note_error(self, run: str, number: int, error: str) -> None:
        """Keep the latest merge error on the round and let its claim lapse now, for a retry."""
        self.redis.hset(keys.round_(run, number), mapping={"last_error": error, "claim_until": 0})

    def _expire(self, run: str, number: int) -> None:
        copies = [*self.accepted_uploads(run, number).values(), *self.replicas(run, number).values()]
        pipe = self.redis.pipeline()
        if copies:
            pipe.delete(*copies)
        for key in (
            keys.round_(run, number),
            keys.round_accepted(run, number),
            keys.round_rejections(run, number),
            keys.round_digests(run, number),
            keys.round_reoffers(run, number),
            keys.round_replicated(run, number),
            keys.round_replicas(run, number),
        ):
            pipe.expire(key, keys.ROUND_TTL)
        pipe.execute()


def number_or_text(text: str) -> Any:
    """Redis hash values come back as text: give numbers back as numbers."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def lua_source(name: str) -> str:
    """The text of ``coordinator/lua/NAME.lua``, after the library its first line includes.

    ``--#include due`` puts ``due.lua`` (whether a round is due, and why) in
    front: the one test ``claim.lua``, ``accept.lua`` and the watcher share.
    """
    text = (resources.files("coordinator") / "lua" / f"{name}.lua").read_text()
    first, _, rest = text.partition("\n")
    if first.startswith(INCLUDE):
        return lua_source(first.removeprefix(INCLUDE).strip()) + "\n" + rest
    return text


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
