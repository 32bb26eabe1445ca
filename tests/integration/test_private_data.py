"""Data that stays home: a volunteer trains on its own files, and only deltas leave its machine."""

from __future__ import annotations

import sysconfig
import uuid
from pathlib import Path

import redis

from tests.conftest import TINY_CHARLM


def _every_value(client: redis.Redis) -> list[bytes]:
    """The bytes of every key's value on the server, whatever its type."""
    values: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            values.append(client.get(key) or b"")
        elif kind == b"hash":
            values.extend(b"%s=%s" % kv for kv in client.hgetall(key).items())
        elif kind == b"list":
            values.extend(client.lrange(key, 0, -1))
        elif kind == b"set":
            values.extend(client.smembers(key))
        elif kind == b"zset":
            values.extend(client.zrange(key, 0, -1))
        values.append(key)
    return values


def _private_corpus(folder: Path, canary: bytes) -> Path:
    """Some Python source, as anyone's own text, with a secret line in every file."""
    folder.mkdir(parents=True)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]
    for source in stdlib:
        (folder / source.name).write_bytes(canary + b"\n" + source.read_bytes() + b"\n" + canary)
    return folder


def test_a_private_canary_reaches_no_redis_value_message_log_or_checkpoint_while_the_model_learns(
    processes, redis_server, tmp_path
):
    canary = f"CANARY-{uuid.uuid4().hex}".encode()
    private = _private_corpus(tmp_path / "alice-private", canary)
    processes.aggregator()
    processes.volunteer("alice", "--data", str(private))
    processes.volunteer("bob")  # no data of its own: refuses the shards of a volunteer-data run
    init = processes.json(
        "init",
        "--run",
        "r",
        "--job",
        "charlm",
        *TINY_CHARLM,
        "--data",
        "volunteer",
        "--local-steps",
        "15",
        "--shards",
        "2",
        "--quorum",
        "1",
        "--deadline",
        "120",
    )
    # act
    document = processes.json("run", "--run", "r", "--rounds", "3")
    # assert: the model learned from alice's text ...
    rounds = document["rounds"]
    assert [r["status"] for r in rounds] == ["done"] * 3, processes.log_tail()
    assert rounds[-1]["eval_loss"] < init["initial"]["eval_loss"]
    reasons = {x["volunteer"]: x["reason"] for r in rounds for x in r["rejections"]}
    assert reasons.get("bob", "no local data") == "no local data"
    # ... and her secret is nowhere but on her machine
    assert not any(canary in value for value in _every_value(redis_server.client()))
    for folder in (processes.home, redis_server.folder):  # logs, checkpoints, metrics; Redis's AOF
        for path in folder.rglob("*"):
            if path.is_file() and private not in path.parents:
                assert canary not in path.read_bytes(), path
