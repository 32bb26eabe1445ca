"""The Redis key schema, TTLs and queue names: where both sides meet.

Every key crowdtrain writes is built here, so the layout can be read in one
place and the volunteer ACL (``coordinator.runs.credentials``) follows it. Every
model, update, residual, strategy state and upload is a blob: a list of
chunks (``broker.blobs``)::

    ct:runs                              set of run names
    ct:run:RUN:config                    msgpack map, written once by ``init``
    ct:run:RUN:version                   current model version (integer)
    ct:run:RUN:rounds                    number of the latest round (integer)
    ct:run:RUN:model:V                   wire bytes of model version V
    ct:run:RUN:staged:V:OWNER            a candidate version V before it is published
    ct:run:RUN:update:V                  version V as an encoded update from V-1 (lossy downlink)
    ct:run:RUN:staged-update:V:OWNER     that update before it is published
    ct:run:RUN:downlink-residual         what the downlink codec has not sent yet (aggregator only)
    ct:run:RUN:staged-residual:OWNER     the residual after a candidate version
    ct:run:RUN:strategy                  wire bytes of the strategy's state
    ct:run:RUN:staged-strategy:OWNER     that state after a candidate version
    ct:run:RUN:dp_clip                   adaptive clipping's current C (DP runs)
    ct:run:RUN:voice-norms               list: norms of voices merged in recent rounds (newest first)
    ct:run:RUN:jobs                      hash: shard jobs posted to an asynchronous run
    ct:run:RUN:finished                  hash: "ROUND:SHARD" of each asynchronous job answered -> outcome
    ct:run:RUN:taken                     set: accepted copies, so none counts in two buffers
    ct:run:RUN:round:N                   hash: status, counters, deadline, claim, summary
    ct:run:RUN:round:N:accepted          hash: shard -> key of the accepted copy
    ct:run:RUN:round:N:digests           hash: sha256 of accepted uploads -> shard
    ct:run:RUN:round:N:rejections        hash: shard|volunteer|upload -> JSON reason
    ct:run:RUN:round:N:reoffers          hash: shard -> times it was posted again after a failure
    ct:run:RUN:round:N:replicated        set: shards posted twice (init --replicate)
    ct:run:RUN:round:N:replicas          hash: shard -> key of the second volunteer's accepted copy
    ct:ensembles                         set of ensemble names (coordinator fuse --method ensemble)
    ct:ensemble:NAME                     JSON: an ensemble's members, their weights and pinned versions
    ct:deadlines                         sorted set: "RUN|N" -> deadline of unfinished rounds
    ct:upload:VOLUNTEER:RUN:N:SHARD:TOKEN  one upload, writable by that volunteer only
    ct:announce                          list: keys of uploads to validate (volunteers: RPUSH only)
    ct:asks                              list: names of volunteers that asked for leases (RPUSH only)
    ct:ask:VOLUNTEER                     list: that volunteer's lease requests (its own: RPUSH only)
    ct:grant:VOLUNTEER:NONCE             list: the answer to one lease request (that volunteer only)
    ct:grant:VOLUNTEER:ID:commit|open    string: that volunteer's answer to capability challenge ID
    ct:challenge:VOLUNTEER               hash: its open capability challenge (trusted side only)
    ct:claims:VOLUNTEER                  JSON: its capability claims and their verdicts (trusted side only)
    ct:claimants                         set: volunteers with a verdict, credited or not (trusted side only)
    ct:lease:RUN:N                       hash: shard -> who holds it, until when (trusted side only)
    ct:offer:RUN:N                       hash: shard -> when the trusted side last offered it
    ct:seen                              sorted set: volunteer -> when it last asked for a lease
    ct:kept:RUN:round:N:upload:VOLUNTEER:SHARD:TOKEN  the bytes validated, out of every volunteer's reach
    ct:kept:RUN:round:N:merge            hash: a sliced round's merge plan, its slices' claims and staging
    ct:kept:RUN:round:N:slice:PLAN:I:OWNER  slice I of that plan as OWNER merged it: tensors, strategy state
    ct:volunteers                        set of volunteer names     (trusted side only)
    ct:identities                        hash: volunteer -> JSON {created, via, revoked} (trusted side only)
    ct:revoked                           set: revoked volunteers, never merged again (trusted side only)
    ct:invite:DIGEST                     hash: an invitation's uses left, expiry (trusted side only)
    ct:invites                           sorted set: DIGEST -> expiry of live invitations (trusted side)
    ct:join:requests                     list: join requests (the joiner user: RPUSH only)
    ct:join:reply:NONCE                  string: the answer to one join request (the joiner: GETDEL only)
    ct:volunteer:NAME                    hash: device and credit    (trusted side only)
    ct:trusted:unacked, ..._index, ..._mutex  kombu's acks-late bookkeeping of the trusted apps
                                         (volunteers keep theirs in kombu's own ``unacked`` keys)
"""

from __future__ import annotations

import re

PREFIX = "ct"
TRAIN_QUEUE = "train"
AGGREGATE_QUEUE = "aggregate"
QUEUES = (TRAIN_QUEUE, AGGREGATE_QUEUE)

UPLOAD_TTL = 24 * 3600
# Round bookkeeping is kept this long after the round ends, then Redis drops it.
ROUND_TTL = 7 * 24 * 3600
# Model versions kept in Redis; older ones stay on disk (export --version reads them).
KEEP_VERSIONS = 3
# Uploads one volunteer may have waiting in Redis before the oldest are dropped.
MAX_OUTSTANDING_UPLOADS = 16
# A staged model that was never published (its aggregator died) goes after this.
STAGED_TTL = 3600
RESULT_EXPIRES = 3600
# kombu's acks_late bookkeeping: volunteers keep theirs under kombu's own names (their ACL grants
# them); the trusted side keeps its own under the prefix, where no volunteer reaches.
UNACKED, UNACKED_INDEX, UNACKED_MUTEX = "unacked", "unacked_index", "unacked_mutex"
TRUSTED_UNACKED = f"{PREFIX}:trusted:unacked"
TRUSTED_UNACKED_INDEX = f"{PREFIX}:trusted:unacked_index"
TRUSTED_UNACKED_MUTEX = f"{PREFIX}:trusted:unacked_mutex"
# The longest task message (a kombu envelope) the trusted side posts is far shorter: a shard's
# arguments and, with a blob store, its presigned upload slot (tasks.arguments bounds it).
MAX_MESSAGE_BYTES = 512 * 1024
# Round and shard numbers, like every task's integers (tasks.arguments), stay below this.
MAX_NUMBER = 1 << 40
# What a run or volunteer name may be: they become parts of keys, ACL users and file names.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # use fullmatch: "$" lets a final newline in
NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-'"
# The shared Redis user of invitation tokens: it may only ask to join (coordinator.runs.invitations).
JOINER = "crowdtrain-joiner"
# An invitation's secret and a join request's reply nonce: 32 random bytes, in hex.
SECRET = re.compile(r"[0-9a-f]{64}")
# An upload's token: random hex, which no one but its volunteer (and the trusted side) sees.
TOKEN = re.compile(r"[0-9a-f]{8,64}")
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() takes "²", which int() refuses


def valid_name(value: object) -> bool:
    """Whether ``value`` may name a run or a volunteer (the one check every side uses)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def runs() -> str:
    return _k("runs")


def ensembles() -> str:
    """Names of the ensembles (``coordinator fuse --method ensemble``); they share runs' names."""
    return _k("ensembles")


def ensemble(name: str) -> str:
    """An ensemble's record (JSON): trusted side only, no volunteer reads it."""
    return _k("ensemble", name)


def run_config(run: str) -> str:
    return _k("run", run, "config")


def run_version(run: str) -> str:
    return _k("run", run, "version")


def run_rounds(run: str) -> str:
    return _k("run", run, "rounds")


def model(run: str, version: int) -> str:
    return _k("run", run, "model", version)


def dp_clip(run: str) -> str:
    """The current clip of a run with adaptive clipping (DP-FedAvg)."""
    return _k("run", run, "dp_clip")


def voice_norms(run: str) -> str:
    """Recent merged rounds' voice norms: the norm screen's yardstick in rounds of few voices."""
    return _k("run", run, "voice-norms")


def run_jobs(run: str) -> str:
    """Counters of an asynchronous run's shard jobs (``posted``)."""
    return _k("run", run, "jobs")


def run_finished(run: str) -> str:
    """An asynchronous run's answered jobs, each once, so the coordinator knows how many are out."""
    return _k("run", run, "finished")


def run_taken(run: str) -> str:
    """Every accepted copy of a run: an upload counts in one round (one buffer) only."""
    return _k("run", run, "taken")


def staged_model(run: str, version: int, owner: str) -> str:
    return _k("run", run, "staged", version, owner)


def update(run: str, version: int) -> str:
    """Version ``version`` as the encoded update from the version before (``--downlink-compression``)."""
    return _k("run", run, "update", version)


def staged_update(run: str, version: int, owner: str) -> str:
    return _k("run", run, "staged-update", version, owner)


def downlink_residual(run: str) -> str:
    """What the lossy downlink codec left out so far: added to the next update."""
    return _k("run", run, "downlink-residual")


def staged_residual(run: str, owner: str) -> str:
    return _k("run", run, "staged-residual", owner)


def strategy(run: str) -> str:
    return _k("run", run, "strategy")


def staged_strategy(run: str, owner: str) -> str:
    return _k("run", run, "staged-strategy", owner)


def round_(run: str, number: int) -> str:
    return _k("run", run, "round", number)


def round_accepted(run: str, number: int) -> str:
    return round_(run, number) + ":accepted"


def round_rejections(run: str, number: int) -> str:
    return round_(run, number) + ":rejections"


def round_digests(run: str, number: int) -> str:
    return round_(run, number) + ":digests"


def round_reoffers(run: str, number: int) -> str:
    return round_(run, number) + ":reoffers"


def round_replicated(run: str, number: int) -> str:
    return round_(run, number) + ":replicated"


def round_replicas(run: str, number: int) -> str:
    return round_(run, number) + ":replicas"


def round_facts(run: str, number: int) -> str:
    """What the intake learned of each accepted copy (its norm and meta), so the merge need not decode it
    to screen it; trusted side only (volunteers may read ``ct:run:*``, not this)."""
    return _k("kept", run, "round", number, "facts")


def accepted_upload(run: str, number: int, volunteer: str, shard: int, token: str) -> str:
    """Where the aggregator keeps the exact bytes it validated: no volunteer may read or write it."""
    return _k("kept", run, "round", number, "upload", volunteer, shard, token)


def merge_plan(run: str, number: int) -> str:
    """A sliced round's split merge (``coordinator.merging.split``): out of every volunteer's reach."""
    return _k("kept", run, "round", number, "merge")


def staged_slice(run: str, number: int, plan: str, position: int, owner: str) -> str:
    """Slice ``position`` of a sliced round's merge ``plan``, as ``owner`` merged it, for the commit."""
    return _k("kept", run, "round", number, "slice", plan, position, owner)


def deadline_member(run: str, number: int) -> str:
    return f"{run}|{number}"


def parse_deadline_member(member: str) -> tuple[str, int]:
    run, _, number = member.rpartition("|")
    return run, int(number)


def deadlines() -> str:
    return _k("deadlines")


def upload(volunteer: str, run: str, number: int, shard: int, token: str) -> str:
    """Uploads live under the volunteer's own prefix, which its ACL user may write."""
    return _k("upload", volunteer, run, number, shard, token)


def parse_upload(key: str) -> tuple[str, str, int, int, str] | None:
    """(volunteer, run, round, shard, token) of an upload key; None for any other key."""
    parts = key.split(":")
    if len(parts) != 7 or parts[:2] != [PREFIX, "upload"]:
        return None
    _, _, volunteer, run, number, shard, token = parts
    if not (_DIGITS.fullmatch(number) and _DIGITS.fullmatch(shard)):
        return None
    return volunteer, run, int(number), int(shard), token


def checked_upload(key: str) -> tuple[str, str, int, int, str] | None:
    """``parse_upload`` for a key that came from a volunteer: None unless every part is well formed."""
    parsed = parse_upload(key)
    if parsed is None:
        return None
    volunteer, run, number, shard, token = parsed
    if not (NAME.fullmatch(volunteer) and NAME.fullmatch(run) and TOKEN.fullmatch(token)):
        return None
    if number >= MAX_NUMBER or shard >= MAX_NUMBER:
        return None
    return parsed


def partial(key: str) -> str:
    """Where a blob too large for one transaction is written before it is renamed to ``key``."""
    return key + ":partial"


def whole(key: str) -> str:
    """The key a ``partial`` key is being written for (any other key is itself)."""
    return key.removesuffix(":partial")


def upload_origin(key: str) -> tuple[str, int, int] | None:
    """(run, round, shard) of an upload key or of an accepted copy's key; None for any other key."""
    parsed = parse_upload(key)
    if parsed is not None:
        return parsed[1], parsed[2], parsed[3]
    parts = key.split(":")
    if (
        len(parts) == 9
        and parts[:2] == [PREFIX, "kept"]
        and (parts[3], parts[5]) == ("round", "upload")
        and _DIGITS.fullmatch(parts[4])
        and _DIGITS.fullmatch(parts[7])
    ):
        return parts[2], int(parts[4]), int(parts[7])
    return None


def run_of(key: str) -> str | None:
    """The run a ``ct:run:RUN:...`` key belongs to; None for any other key."""
    parts = key.split(":")
    return parts[2] if len(parts) > 3 and parts[:2] == [PREFIX, "run"] and NAME.fullmatch(parts[2]) else None


def announcements() -> str:
    """The list of upload keys waiting to be validated: volunteers append, the aggregator drains."""
    return _k("announce")


def upload_pattern(volunteer: str) -> str:
    """The ACL key pattern of everything ``volunteer`` may upload."""
    return _k("upload", volunteer, "*")


def volunteer_of(upload_key: str) -> str:
    """The volunteer name inside an upload key or an accepted copy's key."""
    parts = upload_key.split(":")
    return parts[6] if parts[1] == "kept" else parts[2]


def lease_request(run: str, number: int, shard: int, nonce: str, kind: str = "lease") -> str:
    """One entry of a volunteer's lease requests: ``kind`` is "lease", "renew" or "release" (give back)."""
    return f"{kind}|{run}|{number}|{shard}|{nonce}"


def parse_lease_request(entry: str) -> tuple[str, str, int, int, str] | None:
    """(kind, run, round, shard, nonce) of a well-formed request entry; None for anything else."""
    parts = entry.split("|")
    if len(parts) != 5 or parts[0] not in ("lease", "renew", "release"):
        return None
    kind, run, number, shard, nonce = parts
    if not (NAME.fullmatch(run) and _DIGITS.fullmatch(number) and _DIGITS.fullmatch(shard)):
        return None
    if not TOKEN.fullmatch(nonce) or int(number) >= MAX_NUMBER or int(shard) >= MAX_NUMBER:
        return None
    return kind, run, int(number), int(shard), nonce


def lease_requests() -> str:
    """Names of volunteers that asked for leases: only a hint of which ``lease_inbox`` to read."""
    return _k("asks")


def lease_inbox(volunteer: str) -> str:
    """A volunteer's own lease requests: only it may append, so each request is its own."""
    return _k("ask", volunteer)


def grant(volunteer: str, nonce: str) -> str:
    """The trusted side's answer to one lease request: only ``volunteer`` may read it."""
    return _k("grant", volunteer, nonce)


def grant_pattern(volunteer: str) -> str:
    """The ACL key pattern of every answer to ``volunteer``'s lease requests."""
    return _k("grant", volunteer, "*")


def challenge_answer(volunteer: str, challenge: str, step: str) -> str:
    """Where ``volunteer`` puts its ``commit`` or ``open`` answer to a challenge: its own grant keys."""
    return _k("grant", volunteer, challenge, step)


def challenge(volunteer: str) -> str:
    """A volunteer's open capability challenge: its seed, size, times (no volunteer reads it)."""
    return _k("challenge", volunteer)


def claims(volunteer: str) -> str:
    """A volunteer's capability claims as measured by its challenges (``coordinator.runs.capabilities``)."""
    return _k("claims", volunteer)


def claimants() -> str:
    """Every volunteer with a capability verdict: status lists them even before any credit."""
    return _k("claimants")


def leases(run: str, number: int) -> str:
    """Who holds each shard of a round (field SHARD, or SHARD:r for a replica), until when."""
    return _k("lease", run, number)


def offers(run: str, number: int) -> str:
    """When the trusted side last offered each shard of a round again (``coordinator.rounds.leases``)."""
    return _k("offer", run, number)


def seen() -> str:
    """Volunteer -> when it last asked for a lease: who is online, in the trusted side's own view."""
    return _k("seen")


def volunteers() -> str:
    return _k("volunteers")


def volunteer(name: str) -> str:
    return _k("volunteer", name)


def identities() -> str:
    """Volunteer -> JSON record of when its identity was made (or first seen) and revoked."""
    return _k("identities")


def revoked() -> str:
    """Revoked volunteers: the merge refuses what they left."""
    return _k("revoked")


def similarity(run: str) -> str:
    """Volunteer -> its accumulated direction in ``run`` (``coordinator.merging.sybils``); trusted only."""
    return _k("similarity", run)


def clusters() -> str:
    """Volunteer -> the similarity group it last shared a voice's weight with (``merging.sybils``)."""
    return _k("clusters")


def invitation(digest: str) -> str:
    """One invitation (uses left, expiry), named by the SHA-256 of its secret."""
    return _k("invite", digest)


def invitations() -> str:
    """Every live invitation's digest, scored by its expiry."""
    return _k("invites")


def join_requests() -> str:
    """Join requests pushed by holders of an invitation token (the joiner user: RPUSH only)."""
    return _k("join", "requests")


def join_reply(nonce: str) -> str:
    """The trusted side's answer to the join request that named ``nonce``."""
    return _k("join", "reply", nonce)


def join_reply_pattern() -> str:
    """The ACL key pattern of every join answer (the joiner: GETDEL only, a nonce no one can guess)."""
    return _k("join", "reply", "*")


def join_request(secret: str, nonce: str, name: str) -> str:
    """One join request: the invitation's secret, the reply's nonce, the name asked for."""
    return f"join|{secret}|{nonce}|{name}"


def parse_join_request(entry: str) -> tuple[str, str, str] | None:
    """(secret, nonce, name) of a well-formed join request; None for anything else.

    The name is only checked for shape here (``|`` cannot hide in it); the
    trusted side applies its own rules (reserved names, names taken).
    """
    parts = entry.split("|")
    if len(parts) != 4 or parts[0] != "join":
        return None
    _, secret, nonce, name = parts
    if not (SECRET.fullmatch(secret) and SECRET.fullmatch(nonce) and valid_name(name)):
        return None
    return secret, nonce, name


def _k(*parts: object) -> str:
    return ":".join([PREFIX, *(str(p) for p in parts)])
