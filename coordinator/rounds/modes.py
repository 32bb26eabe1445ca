"""A run's mode as one policy object: where an upload counts, what follows a merge, what is offered again.

The trusted side asks the run's mode (``mode_of(config)``) instead of testing
``--mode`` wherever the two differ: ``Rounds`` for a synchronous run (a round
per posting, a barrier at its merge), ``Buffers`` for an asynchronous one
(``coordinator.rounds.asynchronous``: FedBuff's buffers, no barrier).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.run_config import RunConfig
from coordinator.rounds.asynchronous import open_buffer, slot
from coordinator.store import Store

# The round an upload's job was posted with is ``posted``; ``current`` looks up the run's current round.
Current = Callable[[], dict[str, Any] | None]


@dataclass(frozen=True)
class Placement:
    """Where the intake counts an upload: the round it counts in, its field there, and why it may not."""

    target: int | None = None  # the round it counts in, when not the one it was posted with
    slot: int | None = None  # its field in that round's accepted hash, when not its shard
    blocked: str | None = None  # refused, with this reason


class Rounds:
    """A synchronous run: an upload counts in the round it was posted with, while that round is open."""

    name = "sync"
    grant_flag = "0"  # grant.lua: a shard of a round, given once it is accepted
    reoffers_rounds = True  # an idle open round's unanswered shards are offered again

    def place(self, round_: int, shard: int, posted: dict[str, Any], current: Current) -> Placement | None:
        """Where the upload of ``shard`` of round ``round_`` counts; None: ask again shortly."""
        return Placement(blocked="the round is closed" if posted["status"] != "open" else None)

    @property
    def momentum_delay(self) -> int:
        """Merges between moves of the outer momentum: 1 (plain Nesterov), every merge."""
        return 1

    def summary(self, metas: dict[int, dict], used: dict[int, str]) -> dict[str, Any]:
        """What the round's summary adds for this mode."""
        return {}

    def versions_kept(self, keep: int) -> int:
        """Model versions Redis keeps after a merge (``CROWDTRAIN_KEEP_VERSIONS`` is ``keep``)."""
        return keep

    def after_merge(self, store: Store, run: str) -> None:
        """What follows a merge at once (a synchronous run waits for the coordinator's next post)."""


class Buffers(Rounds):
    """An asynchronous run: an upload counts in the buffer open now, if it is not too stale."""

    name = "async"
    grant_flag = "1"  # grant.lua: a job, given to one volunteer at a time, never accepted twice
    reoffers_rounds = False  # jobs nobody holds are answered 'dropped'; the coordinator posts fresh ones

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def place(self, round_: int, shard: int, posted: dict[str, Any], current: Current) -> Placement | None:
        """The open buffer (None while one is being merged: none is open); stale past ``--max-staleness``.

        ``posted`` is the round the job was posted with: its version is the one
        the delta must have been trained on.
        """
        now = current()
        if now is None or now["status"] != "open":
            return None
        staleness = int(now["base_version"]) - int(posted["base_version"])
        limit = self.config.staleness_limit
        blocked = None
        if staleness > limit:
            blocked = (
                f"stale: trained on version {posted['base_version']}, {staleness} versions behind "
                f"the current {now['base_version']} (at most {limit})"
            )
        return Placement(target=int(now["round"]), slot=slot(round_, shard), blocked=blocked)

    @property
    def momentum_delay(self) -> int:
        """A synchronous round's worth of buffers, ``ceil(shards / buffer)``: the momentum moves about
        as often as it would with rounds of all ``--shards``, by the average of the buffers since."""
        return max(1, math.ceil(self.config.shards / self.config.buffer_size))

    def summary(self, metas: dict[int, dict], used: dict[int, str]) -> dict[str, Any]:
        return {"staleness": max(int(metas[s]["staleness"]) for s in used)}

    def versions_kept(self, keep: int) -> int:
        return max(keep, self.config.staleness_limit + 1)  # a job that old still fetches its base

    def after_merge(self, store: Store, run: str) -> None:
        open_buffer(store, run, self.config)  # the next buffer, at once: no barrier


def mode_of(config: RunConfig) -> Rounds:
    """The policy of a run's ``--mode``."""
    return Buffers(config) if config.is_async else Rounds()
