"""Asynchronous runs' weighting: FedBuff's staleness discount, and slots that never collide."""

from __future__ import annotations

import pytest

from coordinator.rounds.asynchronous import SLOT_STRIDE, slot, staleness_weight


def test_a_stale_delta_weighs_less_the_older_it_is():
    weights = [staleness_weight(s) for s in range(10)]
    assert weights[0] == 1.0 and weights[1] == pytest.approx(2**-0.5) and weights[3] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(weights, weights[1:]))


def test_jobs_of_different_posting_rounds_have_different_slots_in_a_buffer():
    taken = {slot(posted, job) for posted in range(1, 50) for job in (0, 1, 7, SLOT_STRIDE - 1)}
    assert len(taken) == 49 * 4
