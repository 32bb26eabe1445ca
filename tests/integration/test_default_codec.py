"""``init``'s default codec on a model too small for top-k: it must learn as ``--compression none`` does.

The 17-parameter regression of ``tests/fixtures/jobs_small.py`` is one 16-element weight and a
bias. Top 1% of a block of 16 values keeps one of them, and 2-bit codes of one value with error
feedback overshoot; the default's size policy sends tensors that small lossless.
"""

from __future__ import annotations

import pytest

LINEAR = "tests.fixtures.jobs_small:linear"
ROUNDS = 6
GOAL = 1.05  # the default ends within 5% of `none` at equal rounds


def _final_loss(processes, run: str, *flags: str) -> tuple[float, float, str]:
    """(initial, final eval loss, compression) of a run of ROUNDS rounds or versions."""
    init = processes.json(
        "init", "--run", run, "--job", LINEAR, "--shards", "4", "--deadline", "120", *flags
    )  # fmt: skip
    document = processes.json("run", "--run", run, "--rounds", str(ROUNDS))
    assert document["final"]["model_version"] >= ROUNDS, processes.log_tail()
    return init["initial"]["eval_loss"], document["final"]["eval_loss"], init["compression"]


@pytest.mark.parametrize("mode", [(), ("--mode", "async", "--buffer", "2")], ids=["sync", "async"])
def test_a_tiny_regression_with_inits_defaults_learns_as_it_does_uncompressed(processes, mode):
    processes.aggregator()
    processes.volunteer("alice", "--allow-job", LINEAR)
    processes.volunteer("bob", "--allow-job", LINEAR)
    start, default, spec = _final_loss(processes, "defaults", *mode)  # no --compression: init's default
    _, plain, _ = _final_loss(processes, "plain", "--compression", "none", *mode)
    assert default < start, (start, default)
    assert default <= GOAL * plain, f"{spec}: {default:.4f} against none's {plain:.4f}"
