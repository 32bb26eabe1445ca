"""Capability claims become measurements: a volunteer's memory and speed, checked by a challenge.

A volunteer says how much device memory it offers (``volunteer start
--memory-gb``, or all its device has) and how fast its device multiplies
(its speed score, GFLOP/s). Routing (``broker.routing``) takes the memory
at its word; this module tests both. At start, and then every hour, a volunteer asks
for a challenge (``broker.challenge``): the product ``C = A @ B`` of two
+1/-1 matrices drawn from a seed picked here with ``secrets``, sized from
its claims (``size``): the three matrices fill at most half the claimed
memory, and the product takes about ``TARGET_SECONDS`` at the claimed speed,
at most ``N_MAX`` rows. It commits to ``C`` (one SHA-256 per row), and only
then learns which ``OPEN_ROWS`` rows to open (drawn here, with ``secrets``).
The rows must match their digests and pass Freivalds' check ``a (B r) == c r``
for two random vectors ``r``: the trusted side draws all of ``B`` once, a few
rows of ``A``, and does O(n^2) work where the product costs O(n^3).

Verdicts (``ct:claims:NAME``, no volunteer writes it; ``status --json``
shows them as ``claims``): a right answer committed before the deadline
(``SLACK`` times the claimed speed's time, plus a grace for drawing and
hashing, ``deadline_seconds``) verifies
both claims; a right answer committed late fails the speed claim; a wrong
answer, a wrong size or none at all fails both. A lease for a run that needs
more memory than a volunteer has proven, or a GPU, is refused while its
claim stands failed (``refusal``), until a later challenge passes.

Every answer is the volunteer's own: it comes through the request list only
it may append to and the grant keys only it may write, and it answers a
challenge drawn for it alone, once. Sizes are checked (STRLEN) before a byte
is read. See docs/SECURITY.md for what each challenge costs here.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import redis

from broker import challenge, keys
from broker.routing import MEMORY_REFUSAL, SPEED_REFUSAL, Need

log = logging.getLogger("crowdtrain.capabilities")

N_MIN = challenge.BLOCK
N_MAX = 8192  # rows of the largest challenge: the trusted side's cost bound (docs/SECURITY.md)
TARGET_SECONDS = 0.1  # what a challenge costs an honest volunteer, at its claimed speed
MEMORY_SHARE = 0.5  # of the claimed memory, at most, that a challenge's three matrices fill
OPEN_ROWS = 8  # rows of C opened: a product with a fraction w of wrong rows passes with (1-w)^8
VECTORS = 2  # Freivalds vectors per check: a wrong row passes with at most 2^-16 each
SPREAD = 1 << 16  # r's entries are drawn from [0, SPREAD): a*(B r) stays exact in float64
SLACK = 4.0  # an answer may take this many times the claimed speed's time ...
GRACE_SECONDS = 5.0  # ... plus this: the round trips, a busy machine ...
GRACE_PER_ENTRY = 5e-8  # ... and this per entry of C: drawing A and B, hashing C (n = 8192: 3.4 s)
# A claim of a GPU is held to at least this speed (GFLOP/s; float32): every GPU worth routing to
# does more (Apple's M1 2.6 TFLOP/s passes within SLACK), while a CPU (~50-150) must answer an
# n ~ 7900 product in ~8.5 s, which takes it 6-20 s.
GPU_MIN_GFLOPS = 10_000.0
MIN_INTERVAL = 30.0  # seconds between two challenges of one volunteer: a volunteer cannot make us busy
# A volunteer's reported training may imply at most this many times the speed its challenges showed.
# The implied speed counts 2 FLOPs per parameter per sample (one token's forward pass): a loose
# lower bound, so honest training (backward, whole sequences) stays far under it even where mixed
# precision runs well above the float32 speed score.
TRAINING_SLACK = 10.0
STATE_TTL = 3600
ANSWER_TTL = 120
_BYTES_PER_ENTRY = 12  # three n x n float32 matrices
_FIELDS = ("id", "n", "seed", "issued", "deadline", "memory", "gflops", "device", "committed", "open")


def size(memory_gb: float, gflops: float) -> int:
    """Rows of a challenge for these claims: a multiple of ``BLOCK`` in [N_MIN, N_MAX]."""
    by_memory = math.sqrt(max(memory_gb, 0.0) * 2**30 * MEMORY_SHARE / _BYTES_PER_ENTRY)
    by_speed = (max(gflops, 0.0) * 1e9 * TARGET_SECONDS / 2) ** (1 / 3)
    n = int(min(N_MAX, by_memory, by_speed)) // challenge.BLOCK * challenge.BLOCK
    return max(N_MIN, n)


def footprint_gb(n: int) -> float:
    """GB the three matrices of an ``n``-row challenge fill: what a pass proves of memory."""
    return round(_BYTES_PER_ENTRY * n * n / 2**30, 3)


def deadline_seconds(n: int, gflops: float) -> float:
    """How long an ``n``-row challenge may take a device as fast as ``gflops`` claims."""
    return SLACK * 2 * n**3 / (max(gflops, 1e-3) * 1e9) + GRACE_SECONDS + GRACE_PER_ENTRY * n * n


def held_to(gflops: float, device: str) -> float:
    """The speed a challenge is sized and timed for: the claim, and for a GPU at least ``GPU_MIN_GFLOPS``."""
    return max(gflops, GPU_MIN_GFLOPS) if device == "gpu" else gflops


def freivalds(a: np.ndarray, b_r: np.ndarray, c: np.ndarray, r: np.ndarray) -> bool:
    """Freivalds' check that ``c == a @ b``, given ``b_r = b @ r``: O(n^2), where the product is O(n^3).

    Exact for integer matrices while the sums stay below 2^53 (float64). A
    wrong ``c`` passes with probability at most 1/m for ``r`` uniform over
    {0..m-1}^n: 1/2 for a 0/1 vector, 2^-16 for ``SPREAD``.
    """
    left = a.astype(np.float64) @ b_r
    right = c.astype(np.float64) @ r
    return bool(np.array_equal(left, right))


class Capabilities:
    """Issues challenges, checks answers, keeps verdicts and says which leases they rule out."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # --- the exchange ----------------------------------------------------------------
    def handle(self, volunteer: str, entries: Sequence[bytes], now: float | None = None) -> None:
        """Act on a volunteer's challenge entries (from the list only it may append to)."""
        for raw in entries:
            parsed = challenge.parse(raw.decode("ascii", "replace"))
            if parsed is None:
                log.warning("dropped a malformed challenge entry from %s", volunteer)
                continue
            step, nonce, memory, gflops, device = parsed
            try:
                if step == "ask":
                    self._issue(volunteer, nonce, memory, gflops, device, now)
                elif step == "commit":
                    self._commit(volunteer, nonce, now)
                else:
                    self._open(volunteer, nonce, now)
            except redis.ConnectionError:
                raise
            except Exception as e:  # one volunteer's answer must not stop the intake
                log.exception("challenge of %s: %s", volunteer, e)

    def _issue(
        self, volunteer: str, reply: str, memory: float, gflops: float, device: str, now: float | None
    ) -> None:
        now = time.time() if now is None else now
        pending = self._pending(volunteer)
        if pending and now <= float(pending["deadline"]):
            return self._reply(volunteer, reply, {"refused": "a challenge is open"})
        if pending:
            self._verdict(volunteer, pending, now, correct=False, reason="no answer in time")
        last = self._claims(volunteer).get("checked") or 0.0
        if now - float(last) < MIN_INTERVAL:
            return self._reply(volunteer, reply, {"refused": "too soon"})
        speed = held_to(gflops, device)
        n = size(memory, speed)
        ident = secrets.token_hex(16)
        state: dict[str, Any] = {
            "id": ident,
            "n": n,
            "seed": secrets.randbits(63),
            "issued": now,
            "deadline": now + deadline_seconds(n, speed),
            "memory": memory,
            "gflops": gflops,
            "device": device,
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.challenge(volunteer))
        pipe.hset(keys.challenge(volunteer), mapping={k: str(v) for k, v in state.items()})
        pipe.expire(keys.challenge(volunteer), STATE_TTL)
        pipe.execute()
        answer = {
            "challenge": ident,
            "n": n,
            "seed": state["seed"],
            "rows": OPEN_ROWS,
            "deadline": state["deadline"] - now,
        }
        self._reply(volunteer, reply, answer)

    def _commit(self, volunteer: str, ident: str, now: float | None) -> None:
        now = time.time() if now is None else now
        pending = self._pending(volunteer)
        if not pending or pending["id"] != ident or "committed" in pending:
            return  # not the open challenge, or committed already: one answer per challenge
        n = int(pending["n"])
        digests = self._answer(volunteer, ident, "commit", n * challenge.DIGEST)
        if digests is None:
            self._verdict(volunteer, pending, now, correct=False, reason="commitment of the wrong size")
            return
        chosen = sorted(secrets.SystemRandom().sample(range(n), min(OPEN_ROWS, n)))
        self.redis.hset(
            keys.challenge(volunteer),
            mapping={"committed": str(now), "digests": digests, "open": json.dumps(chosen)},
        )
        self._reply(volunteer, ident, {"open": chosen})

    def _open(self, volunteer: str, ident: str, now: float | None) -> None:
        now = time.time() if now is None else now
        pending = self._pending(volunteer)
        if not pending or pending["id"] != ident or "committed" not in pending:
            return
        n, chosen = int(pending["n"]), json.loads(pending["open"])
        data = self._answer(volunteer, ident, "open", len(chosen) * n * 4)
        if data is None:
            self._verdict(volunteer, pending, now, correct=False, reason="opened rows of the wrong size")
            return
        opened = np.frombuffer(data, dtype="<i4").reshape(len(chosen), n)
        digests = self.redis.hget(keys.challenge(volunteer), "digests") or b""
        reason = _wrong(int(pending["seed"]), n, chosen, opened, bytes(digests))
        self._verdict(volunteer, pending, now, correct=reason is None, reason=reason)

    # --- verdicts and routing ----------------------------------------------------
    def claimants(self) -> list[str]:
        """Every volunteer with a verdict, sorted."""
        return sorted(n.decode("ascii", "replace") for n in self.redis.smembers(keys.claimants()))

    def claims(self, names: Sequence[str], now: float | None = None) -> dict[str, dict[str, Any]]:
        """Each volunteer's claims and verdicts for ``status --json`` (an overdue challenge: failed)."""
        now = time.time() if now is None else now
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.get(keys.claims(name))
            pipe.hmget(keys.challenge(name), "deadline", "memory", "gflops", "n", "device")
        replies = pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for name, raw, (deadline, *rest) in zip(names, replies[0::2], replies[1::2], strict=True):
            record = json.loads(raw) if raw else None
            if deadline is not None and now > float(deadline):
                fields = ("memory", "gflops", "n", "device")
                overdue = {k: (v or b"").decode() for k, v in zip(fields, rest, strict=True)}
                record = _judged(record, overdue, now, correct=False, late=True, reason="no answer in time")
            if record is not None:
                out[name] = record
        return out

    def note_training(self, volunteer: str, samples: int, seconds: float, params: int) -> None:
        """Check the samples per second of a volunteer's merged shards against its challenges' speed.

        The verdict goes into its claims as ``samples_per_second``; a volunteer
        never challenged has nothing to be held to, and gets none.
        """
        if seconds <= 0:
            return
        key = keys.claims(volunteer)

        # WATCHed: a verdict written meanwhile is read again (redis-py retries), never overwritten
        def update(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(key)
            if not raw:
                return
            record = json.loads(raw)
            speed = record["speed_gflops"]
            implied = samples * 2 * params / seconds / 1e9
            shown = max(float(speed.get("claimed") or 0), float(speed.get("measured") or 0))
            allowed = TRAINING_SLACK * shown
            record["samples_per_second"] = {
                "reported": round(samples / seconds, 1),
                "verified": bool(speed["verified"]) and implied <= allowed,
                "implied_gflops": round(implied, 3),
            }
            pipe.multi()
            pipe.set(key, json.dumps(record))

        self.redis.transaction(update, key)

    def refusal(self, volunteer: str, need: Need) -> str | None:
        """Why a lease for a run with ``need`` is refused by ``volunteer``'s failed claims, or None."""
        record = self.claims([volunteer]).get(volunteer)
        if record is None:
            return None
        memory, speed = record["memory_gb"], record["speed_gflops"]
        if need.memory_gb and memory["verified"] is False and need.memory_gb > memory.get("proven_gb", 0):
            proven = memory.get("proven_gb", 0)
            return f"{MEMORY_REFUSAL} ({record.get('reason')}); {proven} GB proven"
        if need.device == "gpu" and speed["verified"] is False:
            return f"{SPEED_REFUSAL} ({record.get('reason')})"
        return None

    # --- helpers -------------------------------------------------------------------
    def _verdict(
        self, volunteer: str, pending: dict[str, Any], now: float, correct: bool, reason: str | None
    ) -> None:
        late = float(pending.get("committed") or now) > float(pending["deadline"])
        if correct and late:
            reason = "answered late"
        record = _judged(self._claims(volunteer) or None, pending, now, correct, late, reason)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.claims(volunteer), json.dumps(record))
        pipe.sadd(keys.claimants(), volunteer)
        pipe.delete(
            keys.challenge(volunteer),
            keys.challenge_answer(volunteer, pending["id"], "commit"),
            keys.challenge_answer(volunteer, pending["id"], "open"),
        )
        pipe.execute()
        level = logging.INFO if correct and not late else logging.WARNING
        log.log(level, "challenge of %s (n=%s): %s", volunteer, pending["n"], reason or "passed")

    def _answer(self, volunteer: str, ident: str, step: str, expected: int) -> bytes | None:
        """The answer's bytes if it is exactly ``expected`` long: its size is read before the bytes."""
        key = keys.challenge_answer(volunteer, ident, step)
        try:
            length = int(self.redis.strlen(key))
        except redis.ResponseError:  # not a string: the volunteer's own junk
            return None
        if length != expected:
            return None
        data = self.redis.get(key)
        return bytes(data) if data is not None and len(data) == expected else None

    def _pending(self, volunteer: str) -> dict[str, Any]:
        """Its open challenge's small fields (the digests, up to 256 KiB, are read only to check rows)."""
        values = self.redis.hmget(keys.challenge(volunteer), _FIELDS)
        return {k: v.decode() for k, v in zip(_FIELDS, values, strict=True) if v is not None}

    def _claims(self, volunteer: str) -> dict[str, Any]:
        raw = self.redis.get(keys.claims(volunteer))
        return json.loads(raw) if raw else {}

    def _reply(self, volunteer: str, nonce: str, answer: dict[str, Any]) -> None:
        key = keys.grant(volunteer, nonce)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, msgpack.packb(answer))
        pipe.expire(key, ANSWER_TTL)
        pipe.execute()


def _wrong(seed: int, n: int, chosen: list[int], opened: np.ndarray, digests: bytes) -> str | None:
    """Why opened rows are not rows of the committed, right product; None if they are."""
    for row, values in zip(chosen, opened, strict=True):
        digest = digests[row * challenge.DIGEST : (row + 1) * challenge.DIGEST]
        if challenge.row_digests(values[None, :]) != digest:
            return "an opened row does not match its commitment"
    draw = np.random.default_rng(secrets.randbits(64))
    r = draw.integers(0, SPREAD, size=(n, VECTORS)).astype(np.float64)
    b_r = np.concatenate(
        [
            challenge.rows(seed, challenge.MATRIX_B, n, s, s + challenge.BLOCK) @ r
            for s in range(0, n, challenge.BLOCK)
        ]
    )
    a = np.stack([challenge.rows(seed, challenge.MATRIX_A, n, row, row + 1)[0] for row in chosen])
    if not freivalds(a, b_r, opened, r):
        return "wrong product"
    return None


def _judged(
    record: dict[str, Any] | None,
    pending: dict[str, Any],
    now: float,
    correct: bool,
    late: bool,
    reason: str | None,
) -> dict[str, Any]:
    """The claims record after one challenge: what was claimed, and what it showed."""
    n = int(pending.get("n") or N_MIN)
    proven = float((record or {}).get("memory_gb", {}).get("proven_gb") or 0.0)
    if correct:
        proven = max(proven, footprint_gb(n))
    gflops = float(pending.get("gflops") or 0)
    seconds = float(pending.get("committed") or now) - float(pending.get("issued") or now)
    memory = {"claimed": float(pending.get("memory") or 0), "verified": correct, "proven_gb": proven}
    speed: dict[str, Any] = {"claimed": gflops, "verified": correct and not late}
    if correct and seconds > 0:
        speed["measured"] = round(2 * n**3 / seconds / 1e9, 2)  # a lower bound: it counts the round trips
    return {
        "memory_gb": memory,
        "speed_gflops": speed,
        "samples_per_second": (record or {}).get("samples_per_second"),
        # a GPU's claim is its speed's: a challenge sized for GPU_MIN_GFLOPS at least, in time
        "device": {"claimed": pending.get("device") or "cpu", "verified": correct and not late},
        "challenge_n": n,
        "checked": now,
        "reason": None if correct and not late else reason,
    }
