"""Leases: the trusted side decides who answers which shard.

A volunteer that takes a ``train_shard`` task asks for the shard's lease
before it trains: it appends a request (``keys.lease_request``) to its own
request list ``ct:ask:NAME``, which only its ACL user may append to (and do
nothing else with), and its name to the hint list ``ct:asks``. The
aggregator's intake loop (``coordinator.rounds.announcements``) takes the hinted
lists a batch at a time and answers each request on ``ct:grant:NAME:NONCE``,
which only that volunteer may read: granted (the base version, how long, and
the upload slot of a run with a blob store) or refused with a reason. The
lease itself (``lua/grant.lua``) lives in ``ct:lease:RUN:N``, which no
volunteer can read or write. Capability challenges (``coordinator.runs.capabilities``)
ride on the same lists and answers; a run with needs refuses the lease of a
volunteer whose claim failed its challenge.

A shard is granted to one volunteer at a time (two for a replicated shard,
never the same one twice), only while its round is open and its upload not
accepted, and only while the volunteer holds less than its fair share of the
round (``init --max-share``) while another volunteer is online: it asked for
a lease within the last lease time (one that trains renews every third of
it) and has not dropped out of the round (an upload of its refused, a lease
of its lapsed), so a volunteer that takes shards and drops them holds no one
else back. The intake counts an upload only if the lease it
names is the uploader's, with the upload's token (``coordinator.rounds.intake``);
once accepted the lease is final (``done``), and nothing a volunteer does
afterwards replaces or deletes what is merged. A volunteer renews its lease
while it trains (every third of ``init --lease`` seconds), and releases it
when it has been paused (``volunteer pause``) for a lease's time: its shard
is offered again at once. A shard of an open
round with no accepted upload and no live lease, whose last offer is older
than ``offer_seconds`` (at most ``OFFER_SECONDS``) while the run's queue is empty
(a lapsed lease's at once), is posted again by the
trusted side itself: a message taken off ``train`` and kept, or a lease let
lapse, costs a round about that long, not its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from broker import keys
from broker.challenge import is_challenge
from broker.errors import UnknownRun
from broker.routing import CAPABILITY_REFUSAL
from broker.run_config import RunConfig
from coordinator.rounds.posting import shard_task
from coordinator.rounds.state import lua_source
from coordinator.runs.capabilities import Capabilities
from coordinator.runs.context import RunContexts
from coordinator.store import Store

log = logging.getLogger("crowdtrain.leases")

# Renewed every third of it while the shard trains, so any model fits; a volunteer that dies
# holding a lease costs its shard at most this long.
# A shard not leased this long after it was offered (or after its lease lapsed) is offered again.
OFFER_SECONDS = 10.0
OFFER_CHECK = 1.0  # how often the intake loop looks for shards to offer again
GRANT_TTL = 120  # an answer nobody read leaves Redis after this
NAMES = 256  # hints taken at a time
REQUESTS = 64  # requests taken from one volunteer's list at a time
MAX_REQUEST = 200  # bytes: a request is far shorter (a run name of 64, two numbers, a nonce of 64)
MAX_PENDING = 4096  # requests one volunteer's list may hold; the newest beyond are dropped
MAX_HINTS = 100_000

# post(task name, keyword arguments, queue): how shards are offered again
Post = Callable[[str, dict[str, Any], str], None]


@dataclass(frozen=True)
class Request:
    """One lease request, from the volunteer whose own list held it."""

    volunteer: str
    kind: str  # lease | renew
    run: str
    round: int
    shard: int
    nonce: str  # the upload token, if granted


@dataclass(frozen=True)
class Lease:
    """Who holds a shard (``field``: SHARD, or SHARD:r for a replica), with which token, until when."""

    field: str
    volunteer: str
    token: str
    base_version: int
    expires: float
    state: str  # live | done

    def live(self, now: float) -> bool:
        return self.state == "done" or self.expires > now


def offer_seconds(config: RunConfig) -> float:
    """How long a shard waits, offered and not leased (or after its lease lapsed), to be offered again."""
    return min(OFFER_SECONDS, config.lease_seconds / 2)


class Leases:
    """Grants, checks and ends the leases of every run on one broker."""

    def __init__(self, store: Store, contexts: RunContexts) -> None:
        self.store = store
        self.redis = store.redis
        self.contexts = contexts
        self._grant = self.redis.register_script(lua_source("grant"))
        self._settle = self.redis.register_script(lua_source("settle"))
        self._drain = self.redis.register_script(lua_source("drain"))
        self.capabilities = Capabilities(self.redis)  # challenges travel on the same lists
        self._offer = self.redis.register_script(lua_source("offer"))
        self._checked = 0.0
        # shards whose lease was just refused while they may be free: (run, round) -> shards
        self._refused: dict[tuple[str, int], set[int]] = {}
        self._unheld: dict[tuple[str, int, int], float] = {}  # asynchronous jobs: first seen unheld

    # --- requests ------------------------------------------------------------
    def drain(self) -> int:
        """Answer one batch of requests; how many volunteers' lists were read."""
        _, hinted = self._drain(keys=[keys.lease_requests()], args=[NAMES, 64, MAX_HINTS])
        names = sorted({n.decode("ascii", "replace") for n in hinted} - {""})
        names = [n for n in names if keys.NAME.fullmatch(n)]
        if not names:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            self._drain(keys=[keys.lease_inbox(name)], args=[REQUESTS, MAX_REQUEST, MAX_PENDING], client=pipe)
        try:
            replies = pipe.execute()
        except redis.RedisError:
            # The hints are taken: put them back, or these requests wait for their volunteers to
            # ask again. (A replica promoted by Sentinel lacks the script until redis-py loads it.)
            with contextlib.suppress(redis.RedisError):
                self.redis.rpush(keys.lease_requests(), *names)
            raise
        requests: list[Request] = []
        more: list[str] = []
        for name, (_, entries) in zip(names, replies, strict=True):
            if len(entries) >= REQUESTS:
                more.append(name)  # its list holds more: look again next batch
            challenges = [raw for raw in entries if is_challenge(raw)]
            if challenges:
                self.capabilities.handle(name, challenges)
            for raw in entries:
                if is_challenge(raw):
                    continue
                parsed = keys.parse_lease_request(raw.decode("ascii", "replace"))
                if parsed is None:
                    log.warning("dropped a malformed lease request from %s", name)
                    continue
                requests.append(Request(name, *parsed))
        if more:
            self.redis.rpush(keys.lease_requests(), *more)
        self.answer(requests)
        return len(names)

    def answer(self, requests: Sequence[Request], now: float | None = None) -> list[str]:
        """Grant or refuse each lease request (renew the renewals); the outcomes, in order."""
        now = time.time() if now is None else now
        outcomes: list[str] = ["unknown"] * len(requests)
        pipe = self.redis.pipeline(transaction=False)
        sent: list[tuple[int, int]] = []  # (request, its reply's place in the pipeline)
        unknown: list[int] = []
        refused: list[int] = []  # refused for a capability claim that failed its challenge
        for index, request in enumerate(requests):
            try:
                config = self.contexts[request.run].config
            except (UnknownRun, LookupError):
                unknown.append(index)
                continue
            seconds = config.lease_seconds
            if request.kind in ("renew", "release"):  # a paused volunteer gives its shard back
                operation = "extend" if request.kind == "renew" else "release"
                for field in (str(request.shard), f"{request.shard}:r"):
                    self._settle(
                        keys=[keys.leases(request.run, request.round)],
                        args=[field, request.volunteer, request.nonce, operation, now + seconds],
                        client=pipe,
                    )
                continue
            refusal = self._capability(request, config)
            if refusal is not None:
                outcomes[index] = refusal
                refused.append(index)
                continue
            sent.append((index, len(pipe)))
            self._grant(
                keys=[
                    keys.round_(request.run, request.round),
                    keys.round_accepted(request.run, request.round),
                    keys.leases(request.run, request.round),
                    keys.round_replicated(request.run, request.round),
                    keys.round_replicas(request.run, request.round),
                    keys.seen(),
                    keys.run_finished(request.run),
                ],
                args=[
                    request.shard,
                    request.volunteer,
                    request.nonce,
                    now,
                    seconds,
                    config.max_share,
                    seconds,  # online: asked within a lease (a volunteer renews every third of it)
                    self.contexts[request.run].mode.grant_flag,
                    keys.ROUND_TTL,
                    f"{request.round}:{request.shard}",
                ],
                client=pipe,
            )
        replies = pipe.execute() if len(pipe) else []
        answers = self.redis.pipeline(transaction=False)
        answered = [  # place -1: a request for an unknown run; -2: refused here, outcomes says why
            *sent,
            *((i, -1) for i in unknown if requests[i].kind == "lease"),
            *((i, -2) for i in refused),
        ]
        for index, place in answered:
            request = requests[index]
            outcome = (
                _text(replies[place][0]) if place >= 0 else "unknown" if place == -1 else outcomes[index]
            )
            outcomes[index] = outcome
            answer: dict[str, Any] = {"granted": outcome == "granted", "reason": outcome}
            if outcome == "granted":
                config = self.contexts[request.run].config
                answer.update(
                    token=request.nonce,
                    base_version=int(replies[place][2]),
                    seconds=config.lease_seconds,
                    upload=self.store.upload_slot(request.run, request.round, request.shard),
                )
            if request.kind == "lease" and frees_shard(outcome):
                self._refused.setdefault((request.run, request.round), set()).add(request.shard)
            key = keys.grant(request.volunteer, request.nonce)
            answers.rpush(key, msgpack.packb(answer))
            answers.expire(key, GRANT_TTL)
        if len(answers):
            answers.execute()
        return outcomes

    def _capability(self, request: Request, config: RunConfig) -> str | None:
        """Why a run with needs refuses this volunteer's lease: a capability claim that failed."""
        need = config.need
        if not (need.device or need.memory_gb):
            return None
        return self.capabilities.refusal(request.volunteer, need)

    # --- uploads -------------------------------------------------------------
    def holders(self, shards: Sequence[tuple[str, int, int]]) -> list[list[Lease]]:
        """The leases of each (run, round, shard): its own and its replica's, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run, number, shard in shards:
            pipe.hmget(keys.leases(run, number), str(shard), f"{shard}:r")
        out = []
        for (_, _, shard), values in zip(shards, pipe.execute(), strict=True):
            found = [_parse(field, v) for field, v in zip((str(shard), f"{shard}:r"), values, strict=True)]
            out.append([lease for lease in found if lease is not None])
        return out

    def settle(self, items: Sequence[tuple[str, int, Lease, str]]) -> None:
        """Mark each (run, round, lease, 'done' | 'release'), if it is still its holder's."""
        if not items:
            return
        pipe = self.redis.pipeline(transaction=False)
        for run, number, lease, operation in items:
            self._settle(
                keys=[keys.leases(run, number)],
                args=[lease.field, lease.volunteer, lease.token, operation, 0],
                client=pipe,
            )
        pipe.execute()

    # --- offering again ------------------------------------------------------
    def reoffer(self, post: Post, now: float | None = None) -> int:
        """Post again each shard of an open round that nobody holds and nobody took in time.

        A shard is wanted until its upload (and its replica's, if replicated) is
        accepted; it is offered again when no live lease holds it, its last
        offer is ``offer_seconds`` old, and the run's queue is empty (a
        message still waiting there will be taken first). A shard whose lease
        was just refused (``frees_shard``) is offered again at once, queue
        empty or not: its asker dropped the message it took. That happens at
        most once per shard per ``offer_seconds``, whoever asks and however
        often, so refused requests cannot make the aggregator post without end.
        """
        now = time.time() if now is None else now
        refused, self._refused = self._refused, {}
        routine = now - self._checked >= OFFER_CHECK
        if not (routine or refused):
            return 0
        if routine:
            self._checked = now
        members = [m.decode() for m in self.redis.zrange(keys.deadlines(), 0, -1)]
        rounds = [keys.parse_deadline_member(m) for m in members]
        if not routine:  # only open rounds: a refusal may name any round, a forged one included
            rounds = [key for key in rounds if key in refused]
        posted = 0
        for run, number in rounds:
            try:
                context = self.contexts[run]
            except (UnknownRun, LookupError):
                continue
            wait = offer_seconds(context.config)
            if context.mode.reoffers_rounds:
                at_once = refused.get((run, number), set())
                posted += self._reoffer_round(post, run, number, context.queue, wait, now, at_once)
            elif routine:
                self._drop_jobs(run, context.config, context.queue, wait, now)
        return posted

    def _reoffer_round(
        self,
        post: Post,
        run: str,
        number: int,
        queue: str,
        wait: float,
        now: float,
        refused: Collection[int] = (),
    ) -> int:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.round_(run, number), "status", "shards", "base_version", "posted_at")
        pipe.hkeys(keys.round_accepted(run, number))
        pipe.smembers(keys.round_replicated(run, number))
        pipe.hkeys(keys.round_replicas(run, number))
        pipe.hgetall(keys.leases(run, number))
        pipe.hgetall(keys.offers(run, number))
        pipe.llen(queue)
        (status, shards, base, posted_at), accepted, replicated, replicas, leases, offers, waiting = (
            pipe.execute()
        )
        if status != b"open" or (waiting and not refused):
            return 0
        done = {int(s) for s in accepted}
        second = {int(s) for s in replicated} - {int(s) for s in replicas}
        held: dict[str, Lease] = {}
        for field, value in leases.items():
            lease = _parse(field.decode(), value)
            if lease is not None:
                held[lease.field] = lease
        candidates: dict[int, str] = {}  # shard -> why it may go out again: lua/offer.lua decides
        for shard in range(int(shards)):
            field = f"{shard}:r" if shard in done else str(shard)
            if shard in done and shard not in second:
                continue
            lease = held.get(field)
            if lease is not None and lease.live(now):
                continue
            # a lease that lapsed was waited for already: its shard goes out again at once
            last = max(float(offers.get(str(shard).encode(), 0)), float(posted_at or 0))
            if not waiting and now - last >= wait:
                candidates[shard] = "waited"
            elif shard in refused:
                candidates[shard] = "refused"  # its asker dropped its message: the queue may hold others
        if not candidates:
            return 0
        pairs = [item for shard, why in candidates.items() for item in (shard, why)]
        args = [repr(now), wait, keys.ROUND_TTL, float(posted_at or 0), *pairs]
        again = [int(s) for s in self._offer(keys=[keys.offers(run, number)], args=args)]
        for shard in again:
            post("train_shard", shard_task(run, number, shard, int(shards), int(base)), queue)
        at_once = [s for s in again if candidates[s] == "refused"]
        if again:
            log.info(
                "offered %s round %d shards %s again: nobody holds them%s",
                run,
                number,
                again,
                f" (at once, a lease of {at_once} refused)" if at_once else "",
            )
        return len(again)

    def _drop_jobs(self, run: str, config: RunConfig, queue: str, wait: float, now: float) -> int:
        """An asynchronous run's jobs nobody held for ``wait`` s while its queue was empty: answered.

        Its coordinator keeps ``--shards`` jobs outstanding (posted, not
        answered), so a job taken and kept would hold a place for ever; once
        answered ``dropped`` (a late lease request for it is refused ``taken``)
        the coordinator posts a fresh job, on the current version.
        """
        current = self.store.rounds.count(run)
        rounds = range(max(1, current - config.staleness_limit), current + 1)
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        for number in rounds:
            pipe.hget(keys.round_(run, number), "shards")
            pipe.hgetall(keys.leases(run, number))
        waiting, *replies = pipe.execute()
        jobs = [
            (number, job)
            for number, shards in zip(rounds, replies[0::2], strict=True)
            for job in range(int(shards or 0))
        ]
        finished = self.redis.hmget(keys.run_finished(run), [f"{n}:{j}" for n, j in jobs]) if jobs else []
        held = {
            (number, lease.field)
            for number, leases in zip(rounds, replies[1::2], strict=True)
            for field, value in leases.items()
            if (lease := _parse(field.decode(), value)) is not None and lease.live(now)
        }
        dropped = []
        for (number, job), answer in zip(jobs, finished, strict=True):
            key = (run, number, job)
            if answer is not None or waiting or (number, str(job)) in held:
                self._unheld.pop(key, None)
            elif now - self._unheld.setdefault(key, now) >= wait:
                dropped.append((run, number, job, "dropped"))
                del self._unheld[key]
        for key in [k for k in self._unheld if k[0] == run and k[1] < rounds.start]:
            del self._unheld[key]
        self.store.rounds.answered_many(dropped)
        if dropped:
            log.info("%s: %d jobs nobody held answered as dropped", run, len(dropped))
        return len(dropped)


def frees_shard(outcome: str) -> bool:
    """Whether a refusal leaves its shard to others: the asker's fair share, or its failed claims.

    Its asker took the shard's message and dropped it; the other refusals
    (``leased``, ``taken``, ``closed``, ``unknown``) say the shard is held,
    done or not wanted, and posting it again would help no one.
    """
    return outcome == "share" or outcome.startswith(CAPABILITY_REFUSAL)


def fair_share(shards: int, share: float, online: int) -> int:
    """The most shards of a round one volunteer may hold (``lua/grant.lua`` computes the same)."""
    if online < 2 or share >= 1:
        return shards
    return max(1, min(shards - 1, math.ceil(share * shards - 1e-9)))


def _parse(field: str, value: bytes | None) -> Lease | None:
    if value is None:
        return None
    parts = value.decode("ascii", "replace").split("|")
    if len(parts) != 5:
        return None
    volunteer, token, base, expires, state = parts
    try:
        return Lease(field, volunteer, token, int(base), float(expires), state)
    except ValueError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
