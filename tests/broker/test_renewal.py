"""broker.renewal: one background renewer for a volunteer's lease and an aggregator's claim."""

from __future__ import annotations

import threading

from broker.renewal import renewing


def _join(name: str) -> None:
    """Wait (generously) for the renewal thread of that name to end."""
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{name} still running"


def test_renewing_calls_again_and_again_until_the_block_ends():
    calls: list[int] = []
    third = threading.Event()

    def renew() -> bool:
        calls.append(1)
        if len(calls) >= 3:
            third.set()
        return True

    with renewing(0.01, renew, "test-renewal"):
        assert third.wait(30), "renew was not called three times"
    _join("test-renewal")
    ended = len(calls)
    _join("test-renewal")
    assert len(calls) == ended  # nothing renews once the block is over


def test_renewing_stops_once_renew_says_the_right_is_lost():
    calls: list[int] = []
    first = threading.Event()

    def renew() -> bool:
        calls.append(1)
        first.set()
        return False  # taken over: nothing left to renew

    with renewing(0.01, renew, "lost-renewal"):
        assert first.wait(30), "renew was never called"
        _join("lost-renewal")  # it ends by itself, inside the block
    assert calls == [1]
