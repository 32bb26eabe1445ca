"""Which voices a probed round judges: all of them up to ``--probe-voices``, else a sample.

Probe judging costs one probe pass per judged voice (plus two reads of its
delta), so a round of thousands of voices would spend most of the trusted
side's time on the probe. Above ``--probe-voices`` N voices a round judges:

* every voice that is new or of low reputation (under ``TRUSTED``): trust is
  earned in judged rounds only, so a fresh identity is judged until it has it;
* a random sample of the trusted rest, ``max(N - must, ceil(N / 2))`` of them,
  drawn with ``secrets`` when the round is merged, after its uploads are in:
  nobody, the run's seed and round number included, can know beforehand which
  voices go unjudged.

The judged voices are judged as a round of their own (``coordinator.merging.judging``:
the probe's share, the medians and the agreement are theirs). The unjudged are
merged with their reputation weight; the norm screen and the copy check still
apply to every voice. Reputation moves only for judged (or rejected) voices; a
trusted voice caught in the sample falls to ``CAUGHT`` (0), so one catch costs
more than many sampled rounds earn (docs/SECURITY.md has the cost model and the
catch probability).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from coordinator.merging.verification import next_reputation

# A voice of at least this reputation may go unjudged: three merged judged rounds from
# START_REPUTATION (0.5 -> 0.6 -> 0.68 -> 0.744), or six from 0 after a catch.
TRUSTED = 0.7
# The reputation of a sampled (trusted) voice whose delta is rejected while judged.
CAUGHT = 0.0

_RANDOM = secrets.SystemRandom()


@dataclass(frozen=True)
class Selection:
    """The voices a round judges, and which of them were drawn at random from the trusted ones."""

    judged: frozenset[str]
    sampled: frozenset[str] = frozenset()  # judged: drawn from the trusted voices
    skipped: frozenset[str] = frozenset()  # not judged: the trusted voices not drawn


def trusted(reputation: float | None) -> bool:
    """A voice that may go unjudged: judged before, and merged often enough since its last rejection."""
    return reputation is not None and reputation >= TRUSTED


def sample_size(voices: int, must: int, limit: int) -> int:
    """How many trusted voices are drawn: ``max(limit - must, ceil(limit / 2))``, at most all of them."""
    return min(voices - must, max(limit - must, math.ceil(limit / 2)))


def select(reputations: Mapping[str, float | None], limit: int) -> Selection:
    """The voices to judge among ``reputations``' (every voice of the round, None for a new one).

    Called once the round's uploads are in; the draw uses ``secrets``.
    """
    names = sorted(reputations)
    if len(names) <= limit:
        return Selection(frozenset(names))
    must = [name for name in names if not trusted(reputations[name])]
    rest = [name for name in names if trusted(reputations[name])]
    drawn = frozenset(_RANDOM.sample(rest, sample_size(len(names), len(must), limit)))
    return Selection(frozenset(must) | drawn, drawn, frozenset(rest) - drawn)


def reputations_after(
    reputations: Mapping[str, float | None], selection: Selection, kept: Collection[str]
) -> dict[str, float]:
    """Each judged (or rejected) voice's reputation after the round; unjudged merged voices keep theirs.

    A voice in ``kept`` was merged. A sampled voice that was not was caught:
    ``CAUGHT``. Any other voice moves by ``next_reputation``, as in a round
    where every voice is judged.
    """
    after: dict[str, float] = {}
    for name, value in reputations.items():
        merged = name in kept
        if name in selection.skipped and merged:
            continue  # not judged: nothing earned
        after[name] = CAUGHT if name in selection.sampled and not merged else next_reputation(value, merged)
    return after
