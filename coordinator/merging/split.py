"""A sliced round's merge, shared slice by slice among the aggregators that are running.

The aggregator that claims the round (its planner) screens and judges every
voice once, as for any round, and records the outcome as the round's merge
plan (``keys.merge_plan``): for each slice with accepted deltas, the voices
that trained it in merge order, each with its shards (accepted copy, samples,
staleness) and its weight. It posts ``merge_slices`` on queue ``aggregate``
for the other aggregators, and merges slices itself too. A slice is taken
under a lease (``slice_take.lua``, renewed while it is merged): one whose
aggregator died is taken again once its lease ran out. Whoever takes a slice
merges it from the plan alone, reading that slice's deltas only, and stages
the merged tensors and the slice's strategy state (``keys.staged_slice``).
The planner waits for every slice, puts the version together and publishes
it through the round's own claim (``commit.lua``): exactly once. A planner
that died loses its claim; the round's next claim plans it again under a new
plan id, and the slices staged under the old one are deleted.

A slice is merged the same way whoever merges it (the same deltas and
weights, added in the same order), so the version is the same bit for bit
however the slices were shared out, and the same as one aggregator merging
them all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from broker import keys
from coordinator.rounds.state import CLAIM_LEASE, lua_source
from serialization import TensorDict

# A slice is held this long without renewal; then (its aggregator died) another takes it.
SLICE_LEASE = CLAIM_LEASE
# How often a planner with nothing left to take looks whether the slices held elsewhere are in.
SLICE_POLL = 0.05
ALL_STAGED, ALL_HELD, GONE = -1, -2, -3  # what ``take`` answers when it gives no slice


@dataclass(frozen=True)
class Shard:
    """One accepted delta of a voice: its shard, its accepted copy, what its weight is made of."""

    shard: int
    key: str
    samples: int
    staleness: int


@dataclass(frozen=True)
class Voice:
    """A volunteer's deltas of one slice and the weight the planner gave it."""

    name: str
    weight: float
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class Part:
    """One slice to merge: its index in the run's slices and its voices, in merge order."""

    index: int
    voices: tuple[Voice, ...]


@dataclass(frozen=True)
class MergePlan:
    """What every slice of a round merges: decided once, by the planner."""

    id: str
    base: int
    parts: tuple[Part, ...]

    def dumps(self) -> str:
        # json writes floats by repr, which reads back to the same float: the weights stay exact
        return json.dumps(
            {
                "base": self.base,
                "parts": [
                    [
                        part.index,
                        [
                            [v.name, v.weight, [[s.shard, s.key, s.samples, s.staleness] for s in v.shards]]
                            for v in part.voices
                        ],
                    ]
                    for part in self.parts
                ],
            }
        )

    @classmethod
    def loads(cls, plan_id: str, text: str) -> MergePlan:
        raw = json.loads(text)
        parts = tuple(
            Part(
                int(index),
                tuple(
                    Voice(
                        str(name),
                        float(weight),
                        tuple(Shard(int(s), str(k), int(n), int(t)) for s, k, n, t in shards),
                    )
                    for name, weight, shards in voices
                ),
            )
            for index, voices in raw["parts"]
        )
        return cls(plan_id, int(raw["base"]), parts)


class SplitMerges:
    """The merge plans of sliced rounds in Redis, and the leases on their slices."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._scripts = {
            name: client.register_script(lua_source(name))
            for name in ("slice_take", "slice_renew", "slice_staged")
        }

    def record(self, run: str, number: int, plan: MergePlan) -> None:
        """Make ``plan`` the round's, in place of one a planner that died left (its staging goes)."""
        key = keys.merge_plan(run, number)
        old = self.redis.hgetall(key)
        stale = [v.decode() for f, v in old.items() if f.startswith(b"staged:") and v]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key, *stale)
        pipe.hset(key, mapping={"plan_id": plan.id, "plan": plan.dumps(), "count": len(plan.parts)})
        pipe.expire(key, keys.STAGED_TTL)
        pipe.execute()

    def load(self, run: str, number: int) -> MergePlan | None:
        """The round's merge plan; None if it has none (not sliced, or merged already)."""
        plan_id, text = self.redis.hmget(keys.merge_plan(run, number), "plan_id", "plan")
        if plan_id is None or text is None:
            return None
        return MergePlan.loads(plan_id.decode(), text.decode())

    def take(self, run: str, number: int, plan: MergePlan, owner: str) -> int:
        """A slice's position in ``plan``, now leased to ``owner``; else ALL_STAGED, ALL_HELD or GONE."""
        script = self._scripts["slice_take"]
        return int(
            script(
                keys=[keys.merge_plan(run, number), keys.round_(run, number)],
                args=[plan.id, owner, time.time(), SLICE_LEASE],
            )
        )

    def renew(self, run: str, number: int, plan: MergePlan, position: int, owner: str) -> bool:
        """Extend ``owner``'s lease on a slice; False once it is no longer ours to merge."""
        result = self._scripts["slice_renew"](
            keys=[keys.merge_plan(run, number)], args=[plan.id, position, owner, time.time() + SLICE_LEASE]
        )
        return _text(result) == "renewed"

    def staged(self, run: str, number: int, plan: MergePlan, position: int, where: str) -> str:
        """Record a slice as merged, staged at blob ``where`` ('' for the planner's memory).

        Returns staged | repeat (another was first) | gone (the plan is no longer the round's).
        """
        result = self._scripts["slice_staged"](
            keys=[keys.merge_plan(run, number)], args=[plan.id, position, where]
        )
        return _text(result)

    def staging(self, run: str, number: int, plan: MergePlan) -> dict[int, str] | None:
        """Each staged slice of ``plan``: position -> blob key ('' for the planner's); None if gone."""
        raw = self.redis.hgetall(keys.merge_plan(run, number))
        if raw.get(b"plan_id", b"").decode() != plan.id:
            return None
        return {int(f[7:]): v.decode() for f, v in raw.items() if f.startswith(b"staged:")}

    def clear(self, run: str, number: int, plan: MergePlan) -> None:
        """Drop the plan and what was staged for it: the round is over (or planned again)."""
        staging = self.staging(run, number, plan)
        if staging is None:  # planned again since: what is there is the new plan's
            return
        self.redis.delete(keys.merge_plan(run, number), *(k for k in staging.values() if k))


def pack_slice(tensors: TensorDict, state: TensorDict) -> TensorDict:
    """A merged slice as one blob's tensors: ``weights/NAME`` and ``state/KEY``."""
    return {**{f"weights/{k}": v for k, v in tensors.items()}, **{f"state/{k}": v for k, v in state.items()}}


def unpack_slice(blob: TensorDict) -> tuple[TensorDict, TensorDict]:
    """``pack_slice`` undone: (the slice's tensors, its strategy state), each in the order staged."""
    tensors: TensorDict = {}
    state: TensorDict = {}
    for key, value in blob.items():
        kind, _, name = key.partition("/")
        (tensors if kind == "weights" else state)[name] = value
    return tensors, state


def holds(client: redis.Redis, run: str, number: int, owner: str) -> bool:
    """True while ``owner`` holds the round's claim: a planner that lost it stops waiting."""
    status, holder = client.hmget(keys.round_(run, number), "status", "claim_owner")
    return status == b"aggregating" and holder is not None and holder.decode() == owner


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
