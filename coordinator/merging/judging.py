"""Judging a round's voices before the merge: shards trained twice compared, voices probed.

The rules live in ``coordinator.merging.verification``; this module applies them to a
round's accepted copies, which the aggregator reads for it (``ReadDelta``,
``ReadVoice``), one delta in memory at a time besides the base model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from broker import keys
from coordinator.merging.rules import Evidence, judge
from coordinator.merging.verification import (
    Consensus,
    Prober,
    copies,
    disagreement,
    lone_resolution,
    sketch,
    weigh,
)
from coordinator.rounds.validation import delta_norm
from jobs.interface import Job
from serialization import TensorDict

# (key of an accepted copy, metas to fill in, shard) -> its delta, None if it left Redis
ReadDelta = Callable[[str, dict[int, dict], int], TensorDict | None]
# a volunteer's shards -> its combined delta
ReadVoice = Callable[[list[int]], TensorDict]
# (shard, volunteer, reason)
Rejection = tuple[int, str, str]
# a voice's shards -> its delta norm and sketch as the intake took them (None: not kept, decode it)
KnownVoice = Callable[[list[int]], tuple[float, torch.Tensor] | None]


def voices(used: dict[int, str]) -> dict[str, list[int]]:
    """The round's voices: each volunteer's merged shards."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for shard, key in sorted(used.items()):
        grouped[keys.volunteer_of(key)].append(shard)
    return dict(grouped)


def check_replicas(
    job: Job,
    base: TensorDict,
    replicas: dict[int, str],
    used: dict[int, str],
    metas: dict[int, dict],
    norms: dict[int, float],
    read: ReadDelta,
) -> list[Rejection]:
    """``--replicate``: compare each shard trained twice; the one the probe likes less is rejected.

    When the second training wins, it takes the shard's place in ``used``,
    ``metas`` and ``norms``.
    """
    losers: list[Rejection] = []
    prober: Prober | None = None
    for shard, second_key in sorted(replicas.items()):
        if shard not in used:
            continue  # the first training was rejected already: nothing to compare
        second_meta: dict[int, dict] = {}
        first, second = read(used[shard], {}, shard), read(second_key, second_meta, shard)
        if first is None or second is None:
            continue
        why = disagreement(first, second)
        if why is None:
            continue
        prober = prober or Prober(job, base)
        share = 1.0 / max(1, len(voices(used)))
        ranked = sorted([(prober.gain(first, share), used[shard]), (prober.gain(second, share), second_key)])
        loser, winner = ranked[0][1], ranked[1][1]
        reason = (
            f"replica: disagrees with {keys.volunteer_of(winner)}'s training of the same shard "
            f"({why}) and helps the probe less"
        )
        losers.append((shard, keys.volunteer_of(loser), reason))
        if winner == second_key:
            used[shard], metas[shard], norms[shard] = second_key, second_meta[shard], delta_norm(second)
    return losers


def probe_voices(
    job: Job,
    base: TensorDict,
    used: dict[int, str],
    read: ReadVoice,
    reputations: dict[str, float | None],
    usual_norm: float | None = None,
    sketches: dict[str, torch.Tensor] | None = None,
    last: TensorDict | None = None,
    known: KnownVoice | None = None,
) -> list[Rejection]:
    """``--verify probe``: each voice's agreement and, where a verdict needs it, its gain.

    Each voice is read once for its norm and ``sketch`` (kept for the copy
    check, into ``sketches``); its agreement is measured between sketches,
    which keep cosines within about 0.004 (exactly, for a model of at most
    ``SKETCH`` values), so only one delta is in memory at a time. Gains and
    costs (a probe pass each, and a read) are measured only as the verdicts
    need them (``rules.judge``): a round whose voices all follow each other
    is not probed at all. A round of one voice is probed on its own, against
    the probe's resolution for the run's ``last`` published update at
    ``usual_norm`` (the median norm of recently merged voices).
    """
    prober = Prober(job, base)
    grouped = voices(used)
    share = 1.0 / len(grouped)  # what the merge moves by each voice, about
    consensus = Consensus()
    norms, drawn = {}, {}
    for name, shards in grouped.items():
        norms[name], drawn[name] = _measured(shards, read, known)
        consensus.add(drawn[name], weigh(1.0, reputations.get(name)))
    if sketches is not None:
        sketches.update({name: drawn[name]["sketch"] for name in grouped})
    evidence = {
        name: Evidence(None, norms[name], consensus.agreement(drawn[name], weigh(1.0, reputations.get(name))))
        for name in grouped
    }
    gains: dict[str, float] = {}

    def gain(name: str) -> float:  # one probe pass of a voice, when a verdict needs its gain
        if name not in gains:
            gains[name] = prober.gain(read(grouped[name]), share)
        return gains[name]

    def cost(name: str) -> float:  # one more, when a verdict needs the probe's resolution
        return prober.cost(read(grouped[name]), share, gain(name))

    lone = None
    if len(grouped) == 1:
        ((name, shards),) = grouped.items()
        delta = read(shards)  # one read for its gain and its resolution
        gains[name] = prober.gain(delta, share)
        lone = lone_resolution(prober, delta, gains[name], usual_norm, last)
        del delta
    reasons = judge(evidence, cost, lone, gain)
    return [(shard, name, reasons[name]) for name in reasons for shard in grouped[name]]


def sketch_voices(
    used: dict[int, str], read: ReadVoice, known: KnownVoice | None = None
) -> dict[str, torch.Tensor]:
    """Each voice's ``sketch``, for the copy check of a round that is not probed."""
    return {name: _measured(shards, read, known)[1]["sketch"] for name, shards in voices(used).items()}


def _measured(
    shards: list[int], read: ReadVoice, known: KnownVoice | None
) -> tuple[float, dict[str, torch.Tensor]]:
    """A voice's delta norm and ``{"sketch": its sketch}``: as the intake took them, else decoded."""
    found = known(shards) if known is not None else None
    if found is not None:
        return found[0], {"sketch": found[1]}
    delta = read(shards)
    return delta_norm(delta), {"sketch": sketch(delta)}


def check_copies(
    used: dict[int, str],
    sketches: dict[str, torch.Tensor],
    last: torch.Tensor | None,
    reputations: dict[str, float | None],
) -> list[Rejection]:
    """The shards of the voices that nearly copy another voice or the last published update."""
    reasons = copies(sketches, last, reputations)
    grouped = voices(used)
    return [(shard, name, reasons[name]) for name in reasons for shard in grouped.get(name, [])]


def last_update(current: TensorDict, previous: TensorDict) -> TensorDict:
    """The update that made ``current`` from ``previous`` (floating-point tensors)."""
    return {
        name: tensor - previous[name]
        for name, tensor in current.items()
        if tensor.is_floating_point() and name in previous
    }
