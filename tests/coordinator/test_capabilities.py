"""Capability challenges: Freivalds' check, and the exchange on a real Redis with a real prover."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import volunteer.challenge as prover_module
from broker import challenge, keys
from broker.routing import Need
from coordinator.merging.aggregator import Aggregator
from coordinator.runs import capabilities
from coordinator.runs.capabilities import Capabilities, freivalds
from coordinator.store import Store
from volunteer.challenge import Prover


def _product(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = challenge.rows(seed, challenge.MATRIX_A, n, 0, n)
    b = challenge.rows(seed, challenge.MATRIX_B, n, 0, n)
    return a, b, (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)


def test_freivalds_accepts_the_right_product_and_catches_one_wrong_entry_with_the_stated_odds():
    n, trials = 128, 400
    a, b, c = _product(n, 7)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = rng.integers(0, capabilities.SPREAD, size=n).astype(np.float64)
        assert freivalds(a, b @ r, c, r)
    wrong = c.copy()
    wrong[5, 9] += 2  # one entry off
    # a 0/1 vector misses the error exactly when r[9] == 0: caught half the time
    caught = 0
    for _ in range(trials):
        r = rng.integers(0, 2, size=n).astype(np.float64)
        caught += not freivalds(a, b @ r, wrong, r)
    assert 0.4 < caught / trials < 0.6, caught
    # r drawn from [0, 2^16): missed with probability 2^-16 per vector
    for _ in range(trials):
        r = rng.integers(0, capabilities.SPREAD, size=n).astype(np.float64)
        assert not freivalds(a, b @ r, wrong, r)


def test_blocks_of_rows_are_drawn_alike_whichever_rows_are_asked_for():
    whole = challenge.rows(3, challenge.MATRIX_A, 256, 0, 256)
    assert np.array_equal(challenge.rows(3, challenge.MATRIX_A, 256, 60, 130), whole[60:130])
    assert set(np.unique(whole)) == {-1.0, 1.0}
    assert not np.array_equal(whole, challenge.rows(4, challenge.MATRIX_A, 256, 0, 256))


def test_a_challenge_is_sized_by_the_claims_within_bounds():
    assert capabilities.size(0, 1000) == capabilities.N_MIN  # no memory claimed
    assert capabilities.size(4096, 1e7) == capabilities.N_MAX
    small = capabilities.size(64, 10)  # a slow CPU: about TARGET_SECONDS of its time
    assert small % challenge.BLOCK == 0 and 2 * small**3 / 10e9 <= capabilities.TARGET_SECONDS
    assert capabilities.footprint_gb(capabilities.N_MAX) == 0.75
    # a CPU that claims to be a GPU is sized and timed as one: at 100 GFLOP/s it answers late
    speed = capabilities.held_to(100, "gpu")
    n = capabilities.size(16, speed)
    assert speed == capabilities.GPU_MIN_GFLOPS and n >= 7680
    assert 2 * n**3 / 100e9 > capabilities.deadline_seconds(n, speed)
    assert capabilities.held_to(100, "cpu") == 100 and capabilities.held_to(20_000, "gpu") == 20_000


@pytest.fixture
def trusted(redis_server, tmp_path) -> Iterator[Capabilities]:
    """The trusted side's intake loop answering lease and challenge requests, in a thread."""
    leases = Aggregator(Store(redis_server.client()), tmp_path).leases
    stop = threading.Event()

    def serve() -> None:
        while not stop.wait(0.005):
            leases.drain()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield leases.capabilities
    stop.set()
    thread.join()


def _prover(redis_server, name: str, memory: float = 1.0) -> Prover:
    return Prover(redis_server.client(), name, torch.device("cpu"), memory)


def test_an_honest_answer_verifies_both_claims(trusted, redis_server):
    assert _prover(redis_server, "ann").prove() == "answered"
    record = _wait_claims(trusted, "ann")
    assert record["memory_gb"]["verified"] is True and record["speed_gflops"]["verified"] is True
    assert record["memory_gb"]["claimed"] == 1.0 and record["memory_gb"]["proven_gb"] > 0
    assert record["reason"] is None and record["speed_gflops"]["measured"] > 0
    assert trusted.refusal("ann", Need(None, 1)) is None
    # training it reports must be within TRAINING_SLACK of the speed it showed (2 FLOPs a parameter)
    shown = record["speed_gflops"]["claimed"] * 1e9
    trusted.note_training("ann", 1000, 1000 * 2 * 1000 / shown, 1000)  # as fast as its device
    reported = trusted.claims(["ann"])["ann"]["samples_per_second"]
    assert reported["verified"] is True and reported["reported"] > 0, reported
    trusted.note_training("ann", 1000, 1000 * 2 * 1000 / shown / 100, 1000)  # 100x faster than shown
    assert trusted.claims(["ann"])["ann"]["samples_per_second"]["verified"] is False
    trusted.note_training("nobody", 1000, 1.0, 1000)  # never challenged: nothing to hold it to
    assert trusted.claims(["nobody"]) == {}
    # the next one is refused until MIN_INTERVAL has passed: a volunteer cannot keep us busy
    assert _prover(redis_server, "ann").prove() == "refused: too soon"
    assert not redis_server.client().keys("ct:grant:ann:*:*")  # the answers left Redis


@pytest.mark.parametrize("how", ["random", "smaller"])
def test_a_wrong_answer_fails_both_claims_and_routing_stops_trusting_the_memory(
    trusted, redis_server, monkeypatch, how
):
    honest = prover_module.product

    def lazy(seed: int, n: int, device: torch.device) -> np.ndarray:
        if how == "random":
            return np.random.default_rng().integers(-n, n + 1, size=(n, n)).astype(np.int32)
        out = np.zeros((n, n), dtype=np.int32)
        out[: n // 2, : n // 2] = honest(seed, n, device)[: n // 2, : n // 2]
        return out

    monkeypatch.setattr(prover_module, "product", lazy)
    assert _prover(redis_server, "mal", memory=16).prove() == "answered"
    record = _wait_claims(trusted, "mal")
    assert record["memory_gb"] == {"claimed": 16.0, "verified": False, "proven_gb": 0.0}
    assert record["speed_gflops"]["verified"] is False and record["reason"] == "wrong product"
    assert "memory claim failed" in str(trusted.refusal("mal", Need(None, 8)))
    assert "speed claim failed" in str(trusted.refusal("mal", Need("gpu", 0)))
    assert trusted.refusal("mal", Need(None, 0)) is None


def test_an_answer_of_the_wrong_size_or_for_another_challenge_counts_for_nothing(trusted, redis_server):
    client = redis_server.client()
    reply = "ab" * 16
    client.rpush(keys.lease_inbox("eve"), challenge.ask_entry(reply, 1, 10, "cpu"))
    client.rpush(keys.lease_requests(), "eve")
    offer = prover_module.msgpack.unpackb(client.blpop([keys.grant("eve", reply)], timeout=10)[1])
    ident = offer["challenge"]
    # a commitment for another challenge id is ignored; a huge one is refused unread
    client.set(keys.challenge_answer("eve", "cd" * 16, "commit"), b"x")
    client.rpush(keys.lease_inbox("eve"), challenge.step_entry("commit", "cd" * 16))
    client.set(keys.challenge_answer("eve", ident, "commit"), b"\0" * (offer["n"] * 32 + 1))
    client.rpush(keys.lease_inbox("eve"), challenge.step_entry("commit", ident))
    client.rpush(keys.lease_requests(), "eve")
    record = _wait_claims(trusted, "eve")
    assert record["reason"] == "commitment of the wrong size" and record["memory_gb"]["verified"] is False


def test_no_answer_by_the_deadline_shows_as_failed(trusted, redis_server):
    client = redis_server.client()
    client.rpush(keys.lease_inbox("sam"), challenge.ask_entry("ef" * 16, 1, 10, "cpu"))
    client.rpush(keys.lease_requests(), "sam")
    client.blpop([keys.grant("sam", "ef" * 16)], timeout=10)
    deadline = float(client.hget(keys.challenge("sam"), "deadline"))
    assert trusted.claims(["sam"], now=deadline - 1) == {}  # still open: no verdict yet
    late = trusted.claims(["sam"], now=deadline + 1)["sam"]
    assert late["speed_gflops"]["verified"] is False and late["reason"] == "no answer in time"


def _wait_claims(trusted: Capabilities, name: str) -> dict:
    from tests.conftest import wait_until

    return wait_until(lambda: trusted.claims([name]).get(name), f"{name}'s verdict", timeout=30)
