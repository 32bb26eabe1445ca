"""The Redis key schema, TTLs and queue names: where both sides meet.

Every key crowdtrain writes is built here, so the layout can be read in one
place and the volunteer ACL (``coordinator.credentials``) follows it::

    ct:runs                              set of run names
    ct:run:RUN:config                    msgpack map, written once by ``init``
    ct:run:RUN:version                   current model version (integer)
    ct:run:RUN:rounds                    number of the latest round (integer)
    ct:run:RUN:model:V                   wire bytes of model version V
    ct:run:RUN:staged:V:OWNER            a candidate version V before it is published
    ct:run:RUN:strategy                  wire bytes of the strategy's state
    ct:run:RUN:round:N                   hash: status, counters, deadline, claim, summary
    ct:run:RUN:round:N:accepted          hash: shard -> upload key
    ct:run:RUN:round:N:rejections        hash: shard|volunteer|upload -> JSON reason
    ct:deadlines                         sorted set: "RUN|N" -> deadline of unfinished rounds
    ct:upload:VOLUNTEER:RUN:N:SHARD:TOKEN  one upload, writable by that volunteer only
    ct:volunteers                        set of volunteer names
    ct:volunteer:NAME                    hash: device and credit
"""

from __future__ import annotations

PREFIX = "ct"
TRAIN_QUEUE = "train"
AGGREGATE_QUEUE = "aggregate"
QUEUES = (TRAIN_QUEUE, AGGREGATE_QUEUE)

UPLOAD_TTL = 24 * 3600
# Round bookkeeping is kept this long after the round ends, then Redis drops it.
ROUND_TTL = 7 * 24 * 3600
# A staged model that was never published (its aggregator died) goes after this.
STAGED_TTL = 3600
RESULT_EXPIRES = 3600


def runs() -> str:
    return _k("runs")


def run_config(run: str) -> str:
    return _k("run", run, "config")


def run_version(run: str) -> str:
    return _k("run", run, "version")


def run_rounds(run: str) -> str:
    return _k("run", run, "rounds")


def model(run: str, version: int) -> str:
    return _k("run", run, "model", version)


def staged_model(run: str, version: int, owner: str) -> str:
    return _k("run", run, "staged", version, owner)


def strategy(run: str) -> str:
    return _k("run", run, "strategy")


def round_(run: str, number: int) -> str:
    return _k("run", run, "round", number)


def round_accepted(run: str, number: int) -> str:
    return round_(run, number) + ":accepted"


def round_rejections(run: str, number: int) -> str:
    return round_(run, number) + ":rejections"


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


def upload_pattern(volunteer: str) -> str:
    """The ACL key pattern of everything ``volunteer`` may upload."""
    return _k("upload", volunteer, "*")


def volunteer_of(upload_key: str) -> str:
    """The volunteer name inside an upload key."""
    return upload_key.split(":")[2]


def volunteers() -> str:
    return _k("volunteers")


def volunteer(name: str) -> str:
    return _k("volunteer", name)


def _k(*parts: object) -> str:
    return ":".join([PREFIX, *(str(p) for p in parts)])
