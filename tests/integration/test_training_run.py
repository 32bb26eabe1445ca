"""A whole run through a real redis-server, a real aggregator and real volunteers."""

from __future__ import annotations

import json
import math
import threading

import torch
from safetensors.torch import load_file

from broker import blobs, keys
from coordinator.merging.aggregator import Aggregator
from coordinator.store import Store
from tests.conftest import TINY_CHARLM


def test_three_rounds_with_two_volunteers_make_consecutive_versions_and_lower_loss(processes):
    # arrange
    processes.aggregator()
    processes.volunteer("alice")
    processes.volunteer("bob")
    init = processes.json(
        "init",
        "--run",
        "demo",
        "--job",
        "charlm",
        *TINY_CHARLM,
        "--local-steps",
        "15",
        "--shards",
        "4",
        "--deadline",
        "120",
    )
    # act
    document = processes.json("run", "--run", "demo", "--rounds", "3")
    # assert
    rounds = document["rounds"]
    assert [r["model_version"] for r in rounds] == [1, 2, 3], processes.log_tail()
    assert all(r["accepted"] == 4 and r["rejected"] == 0 for r in rounds)
    assert all(r["uplink_bytes"] > 0 for r in rounds)
    # version 0 is built on each volunteer from the job's seed (its digest checked); later ones fetched
    assert rounds[0]["downlink_bytes"] == 0 and all(r["downlink_bytes"] > 0 for r in rounds[1:])
    losses = [init["initial"]["eval_loss"]] + [r["eval_loss"] for r in rounds]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert document["final"] == {
        "model_version": 3,
        "eval_loss": rounds[-1]["eval_loss"],
        "eval_accuracy": rounds[-1]["eval_accuracy"],
    }
    assert {"run", "job", "strategy", "compression", "initial"} <= document.keys()

    # export: a float32 safetensors file with the model's names and shapes
    out = processes.home / "demo.safetensors"
    result = processes.cli("export", "--run", "demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    tensors = load_file(out)
    from jobs import load_job
    from jobs.loader import parse_job_args

    model = load_job("charlm", parse_job_args(TINY_CHARLM[1::2])).build_model()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(math.isfinite(float(v.float().abs().max())) for v in tensors.values())

    # status: the run, the queues and both volunteers with their credit
    status = processes.json("status")
    assert status["runs"][0]["model_version"] == 3
    assert status["queues"] == {"train": 0, "aggregate": 0}
    volunteers = {v["name"]: v for v in status["volunteers"]}
    assert set(volunteers) == {"alice", "bob"}
    assert sum(v["accepted"] for v in volunteers.values()) == 12
    assert all(v["online"] for v in volunteers.values())


def test_a_gpt_round_trains_on_a_jsonl_corpus_and_sample_prints_its_text(processes, tmp_path):
    """The ``gpt`` job end to end: volunteers train its tokenizer and model; ``sample`` shows the result."""
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"body": f"volunteer {i} trains the shared model on donated machines. " * 8} for i in range(30)]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    processes.aggregator()
    processes.volunteer("alice")
    gpt = ["layers=1", "width=32", "heads=2", "context=32", "vocab=320", "positions=rotary"]
    gpt += [f"corpus={corpus}", "text_field=body"]
    init = processes.json(
        "init", "--run", "g", "--job", "gpt", *[x for arg in gpt for x in ("--job-arg", arg)],
        "--local-steps", "20", "--shards", "2", "--deadline", "120",
    )  # fmt: skip
    assert (processes.home / "runs" / "g" / "tokenizer.json").is_file()
    document = processes.json("run", "--run", "g", "--rounds", "1")
    assert document["rounds"][0]["accepted"] == 2, processes.log_tail()
    assert document["final"]["eval_loss"] < init["initial"]["eval_loss"]
    sampled = processes.json("sample", "--run", "g", "--prompt", "volunteer", "--tokens", "12")
    assert sampled["version"] == 1 and sampled["text"].startswith("volunteer")
    assert len(sampled["text"]) > len("volunteer")


def test_a_lossy_downlink_sends_updates_that_volunteers_rebuild_bit_for_bit(processes, redis_server):
    """``--downlink-compression int8``: versions also published as updates; rebuilt, they are the model."""
    from serialization import loads
    from volunteer.store import VolunteerStore
    from volunteer.worker import ShardRunner, VolunteerOptions

    processes.aggregator()
    processes.volunteer("alice")
    processes.json(
        "init",
        "--run",
        "d",
        "--job",
        "charlm",
        *TINY_CHARLM,
        "--local-steps",
        "5",
        "--shards",
        "2",
        "--compression",
        "int8",
        "--deadline",
        "120",
    )  # fmt: skip  (the downlink follows --compression)
    document = processes.json("run", "--run", "d", "--rounds", "4")
    rounds = document["rounds"]
    assert [r["model_version"] for r in rounds] == [1, 2, 3, 4], processes.log_tail()
    # version 0 is built from the job's seed; then each version comes as an int8 update, about a
    # quarter of the model (the volunteer's first shard of a round holds the version before)
    model = len(blobs.read(redis_server.client(), "ct:run:d:model:4"))
    assert rounds[0]["downlink_bytes"] == 0 and all(0 < r["downlink_bytes"] < model for r in rounds[1:]), (
        rounds
    )

    client = redis_server.client()
    runner = ShardRunner(VolunteerStore(client, "probe"), VolunteerOptions(name="probe"))
    runner._models[("d", 2)] = loads(blobs.read(client, "ct:run:d:model:2"))[
        0
    ]  # a volunteer holding version 2
    rebuilt, fetched = runner._model("d", 4)
    updates = [len(blobs.read(client, f"ct:run:d:update:{v}")) for v in (3, 4)]
    assert fetched == sum(updates) and max(updates) < 0.3 * len(blobs.read(client, "ct:run:d:model:4"))
    out = processes.home / "v4.safetensors"
    assert processes.cli("export", "--run", "d", "--version", "4", "--out", str(out)).returncode == 0
    exported = load_file(out)
    assert exported.keys() == rebuilt.keys()
    assert all(torch.equal(exported[k], rebuilt[k]) for k in exported)  # bit for bit


def test_version_0_is_built_from_the_seed_when_its_bytes_match_and_fetched_otherwise(processes, redis_server):
    import msgpack

    from serialization import loads
    from volunteer.store import VolunteerStore
    from volunteer.worker import ShardRunner, VolunteerOptions

    tiny = "tests.fixtures.jobs_tiny:make_job"
    processes.json("init", "--run", "z", "--job", tiny)
    client = redis_server.client()
    stored = loads(blobs.read(client, "ct:run:z:model:0"))[0]

    def runner() -> ShardRunner:
        return ShardRunner(
            VolunteerStore(client, "v"), VolunteerOptions(name="v", allowed_jobs=frozenset({tiny}))
        )

    built, fetched = runner()._model("z", 0)
    assert fetched == 0 and all(torch.equal(built[k], stored[k]) for k in stored)
    config = msgpack.unpackb(client.get("ct:run:z:config"))
    client.set("ct:run:z:config", msgpack.packb({**config, "initial_digest": "0" * 64}))  # another torch
    _, fetched = runner()._model("z", 0)
    assert fetched == len(blobs.read(client, "ct:run:z:model:0"))


def test_a_volunteer_builds_one_model_per_run_only_where_the_job_allows(processes, redis_server, monkeypatch):
    """``reuse_model``: shard after shard on one model, with the losses of a model built per shard."""
    from tests.fixtures.jobs_tiny import TinyJob
    from volunteer.store import VolunteerStore
    from volunteer.worker import ShardRunner, VolunteerOptions

    tiny = "tests.fixtures.jobs_tiny:make_job"
    builds: list[int] = []
    build = TinyJob.build_model
    monkeypatch.setattr(TinyJob, "build_model", lambda self: builds.append(1) or build(self))
    processes.json(
        "init", "--run", "z", "--job", tiny, "--shards", "3", "--verify", "none", "--max-share", "1"
    )
    assert processes.json("post-round", "--run", "z")["round"] == 1
    client = redis_server.client()
    leases = Aggregator(Store(client), processes.home).leases  # the trusted side answers lease requests
    stop = threading.Event()

    def answer() -> None:
        while not stop.wait(0.005):
            leases.drain()

    threading.Thread(target=answer, daemon=True).start()

    def three_shards(name: str) -> list[float]:
        runner = ShardRunner(
            VolunteerStore(client, name), VolunteerOptions(name=name, allowed_jobs=frozenset({tiny}))
        )
        del builds[:]
        results = [runner.run("z", 1, shard, 3, 0) for shard in range(3)]
        assert all("loss" in r for r in results), results
        return [r["loss"] for r in results]

    reused = three_shards("a")
    assert len(builds) == 2  # version 0 from the seed, then one model for all three shards
    monkeypatch.setattr(TinyJob, "reuse_model", False)
    client.delete(keys.leases("z", 1))  # a's leases forgotten: b may lease the same shards
    fresh = three_shards("b")
    stop.set()
    assert len(builds) == 4  # version 0, then a model per shard
    assert reused == fresh
