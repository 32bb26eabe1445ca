"""The volunteer's side of a capability challenge: show that its memory and speed claims hold.

Before its first shard, and then every ``PERIOD`` seconds, a volunteer asks
the trusted side for a challenge with its claims (the memory it offers, the
device class, and a speed score measured here), multiplies the two matrices
the challenge's seed draws (``broker.challenge``) on its training device,
commits to the product, and opens the rows it is then asked for. The
exchange rides on the lease request list and grant keys its Redis user
already has; the verdict is the trusted side's (``coordinator.runs.capabilities``).
A challenge that cannot be answered (an older aggregator, a broker blip) is
logged and tried again a period later: it never stops the shard.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import msgpack
import numpy as np
import redis
import torch

from broker import challenge, keys
from volunteer.devices import device_class, speed_score

log = logging.getLogger("crowdtrain.volunteer")

PERIOD = 3600.0  # seconds between two challenges of one worker process
REPLY_WAIT = 10  # seconds to wait for each of the trusted side's answers
SPEED_SECONDS = 0.1  # how long the speed score measures
ANSWER_TTL = 120


class Prover:
    """Answers this volunteer's capability challenges, once at the start and then every ``PERIOD``."""

    def __init__(self, client: redis.Redis, name: str, device: torch.device, memory_gb: float) -> None:
        self.redis = client
        self.name = name
        self.device = device
        self.memory_gb = memory_gb
        self._due = 0.0
        self._gflops: float | None = None

    @property
    def due(self) -> float:
        """When the next challenge is due (``time.monotonic``)."""
        return self._due

    def maybe(self) -> None:
        """Answer a challenge if one is due; never raises (a failed try waits a period)."""
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + PERIOD
        try:
            self.prove()
        except Exception as e:  # a broker blip, out of memory, an answer of the wrong shape: a period later
            log.warning("capability challenge not answered: %s: %s", type(e).__name__, e)

    def prove(self) -> str:
        """Ask for a challenge and answer it; what happened, in words."""
        if self._gflops is None:
            self._gflops = speed_score(self.device, SPEED_SECONDS)
        reply = uuid.uuid4().hex
        self._tell(challenge.ask_entry(reply, self.memory_gb, self._gflops, device_class(self.device)))
        offer = self._wait(reply)
        if offer is None or "refused" in offer:
            outcome = "no answer" if offer is None else f"refused: {offer['refused']}"
            log.info("capability challenge %s", outcome)
            return outcome
        ident, n, seed = str(offer["challenge"]), int(offer["n"]), int(offer["seed"])
        started = time.monotonic()
        c = product(seed, n, self.device)
        self._put(ident, "commit", challenge.row_digests(c))
        opening = self._wait(ident)
        if opening is None:
            return "no rows asked"
        chosen = [int(row) for row in opening["open"]]
        self._put(ident, "open", np.ascontiguousarray(c[chosen], dtype="<i4").tobytes())
        log.info("capability challenge answered: n=%d in %.2fs", n, time.monotonic() - started)
        return "answered"

    def _put(self, ident: str, step: str, data: bytes) -> None:
        """Store one answer under our own grant keys and say so, in one transaction."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.challenge_answer(self.name, ident, step), data, ex=ANSWER_TTL)
        pipe.rpush(keys.lease_inbox(self.name), challenge.step_entry(step, ident))
        pipe.rpush(keys.lease_requests(), self.name)
        pipe.execute()

    def _tell(self, entry: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(keys.lease_inbox(self.name), entry)
        pipe.rpush(keys.lease_requests(), self.name)
        pipe.execute()

    def _wait(self, nonce: str) -> dict[str, Any] | None:
        reply = self.redis.blpop([keys.grant(self.name, nonce)], timeout=REPLY_WAIT)
        if reply is None:
            return None
        answer: dict[str, Any] = msgpack.unpackb(reply[1])
        return answer


def product(seed: int, n: int, device: torch.device) -> np.ndarray:
    """The challenge's product ``A @ B`` computed on ``device``, as int32 (every entry is exact)."""
    a = torch.from_numpy(challenge.rows(seed, challenge.MATRIX_A, n, 0, n)).to(device)
    b = torch.from_numpy(challenge.rows(seed, challenge.MATRIX_B, n, 0, n)).to(device)
    c = (a @ b).round().to(torch.int32).cpu().numpy()
    del a, b
    return c
