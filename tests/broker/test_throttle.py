"""Rate-limited warnings: a few lines and a count per period, whatever the flood."""

from __future__ import annotations

import logging

import pytest

from broker.throttle import Throttle


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


@pytest.fixture
def logger(clock: list[float], caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.INFO, logger="test.throttle")
    logger = logging.getLogger("test.throttle")
    limiter = Throttle(period=10.0, burst=3, clock=lambda: clock[0])
    logger.addFilter(limiter)
    logger.limiter = limiter  # type: ignore[attr-defined]
    yield logger
    logger.removeFilter(limiter)


def test_a_template_passes_its_burst_per_period_and_the_rest_is_counted(logger, clock, caplog):
    # act: 10,000 bogus inputs of one kind, 2 of another, then the period ends
    for i in range(10_000):
        logger.warning("dropped junk %d", i)
    logger.warning("other kind %d", 1)
    logger.warning("other kind %d", 2)
    logger.info("accepted %d", 1)  # progress lines are never held back
    clock[0] = 10.0
    logger.limiter.flush()
    # assert
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "dropped junk 0",
        "dropped junk 1",
        "dropped junk 2",
        "other kind 1",
        "other kind 2",
        "accepted 1",
        "9997 more like this in the last 10s: dropped junk %d",
    ]
    assert caplog.records[-1].levelno == logging.WARNING


def test_the_count_also_comes_with_the_next_line_of_that_logger(logger, clock, caplog):
    for i in range(5):
        logger.error("bad %d", i)
    clock[0] = 12.0
    logger.warning("later")
    assert [r.getMessage() for r in caplog.records] == [
        "bad 0",
        "bad 1",
        "bad 2",
        "2 more like this in the last 10s: bad %d",
        "later",
    ]
    # a new period starts afresh
    logger.error("bad %d", 9)
    assert caplog.records[-1].getMessage() == "bad 9"
