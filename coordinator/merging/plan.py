"""A round's plan: what the checks decided before anything is merged, as data.

``Aggregator._plan`` makes it (screen, replicas, work check, judging, Sybil
shaping), the merge reads its voices and weights, and ``Publisher.publish``
acts on the rest once the version is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.merging import work
from coordinator.merging.judging import Rejection
from coordinator.merging.sampling import Selection
from coordinator.merging.sybils import Plan


@dataclass
class RoundPlan:
    """What the checks decided for a round, before anything is merged: the voices to merge (their
    accepted copies, metas and norms), the rejections, the judged reputations and the Sybil shaping,
    or why the round cannot be merged."""

    used: dict[int, str]  # shard -> accepted copy, of the voices to merge
    metas: dict[int, dict]
    norms: dict[int, float]
    rejections: list[Rejection]
    revoked: dict[int, str] = field(default_factory=dict)  # shard -> volunteer revoked meanwhile
    reputations: dict[str, float | None] = field(default_factory=dict)  # a judged round's, before it
    selection: Selection = field(default_factory=lambda: Selection(frozenset()))
    checked: work.Checked | None = None  # the work check's findings (--work-check)
    sybils: Plan | None = None  # probation, similarity groups, clipping (coordinator.merging.sybils)
    failure: str | None = None  # why the round fails instead
