"""A model over Redis's 512 MB value limit trains a round end to end (blobs are chunked).

The round runs with ``init``'s defaults: a lossy codec both ways (top-k), so the
aggregator also stages the version as an update and its downlink residual, and
the volunteer keeps an error-feedback residual: the memory bounds are measured
with every model-sized thing a default run holds.
"""

from __future__ import annotations

import math
import time

import msgpack
import torch
from safetensors.torch import load_file

from broker import blobs, keys
from tests.fixtures.memory import peak_bytes, reset_peak

# About 155M float32 parameters (620 MB): one charlm layer of width 3584.
LARGE_CHARLM = [
    "--job-arg",
    "layers=1",
    "--job-arg",
    "width=3584",
    "--job-arg",
    "heads=4",
    "--job-arg",
    "context=8",
    "--job-arg",
    "batch_size=2",
    "--job-arg",
    "max_files=2",
    "--job-arg",
    "eval_batches=1",
]
REDIS_VALUE_LIMIT = 512 * 1024 * 1024


def test_a_round_of_a_model_over_the_redis_value_limit_is_trained_merged_and_exported(
    processes, redis_server
):
    chunk_mib = 16
    processes.extra_env[blobs.CHUNK_ENV] = str(chunk_mib)
    client = redis_server.client()
    # Redis itself refuses any value over one chunk, from any client, for the whole round:
    # staged blobs (the model, the update, the downlink residual) that live only until the
    # commit are held to the bound as well as what is left at the end.
    client.config_set("proto-max-bulk-len", chunk_mib << 20)
    aggregator = processes.aggregator()  # its tasks run in this process (solo pool)
    volunteer = processes.volunteer("alice", "--pool", "solo", "--concurrency", "1")
    processes.wait_online("aggregator", "alice")  # start-up over: their memory at rest
    idle = {pid: reset_peak(pid) for pid in (aggregator.pid, volunteer.pid)}
    init = processes.json(
        "init",
        "--run",
        "big",
        "--job",
        "charlm",
        *LARGE_CHARLM,
        # init's default codec both ways (a lossy downlink: the staged update and residual)
        "--verify",
        "none",
        "--local-steps",
        "1",
        "--shards",
        "1",
        "--deadline",
        "600",
    )
    config = msgpack.unpackb(client.get(keys.run_config("big")))
    assert config["downlink_compression"] == config["compression"] == init["compression"] != "none"
    model_key = keys.model("big", 0)
    declared, _ = blobs.sizes(client, model_key)
    assert declared > REDIS_VALUE_LIMIT, f"the model must not fit one Redis value ({declared} bytes)"

    started = time.monotonic()
    document = processes.json("run", "--run", "big", "--rounds", "1")
    seconds = time.monotonic() - started

    (round_,) = document["rounds"]
    assert round_["model_version"] == 1 and round_["accepted"] == 1, processes.log_tail()
    assert 0 < round_["uplink_bytes"] < REDIS_VALUE_LIMIT // 50, "the default codec compresses the delta"
    assert math.isfinite(round_["eval_loss"])
    assert round_["eval_loss"] != init["initial"]["eval_loss"], "the merged delta moved the model"
    assert int(client.config_get("proto-max-bulk-len")["proto-max-bulk-len"]) == chunk_mib << 20
    assert _largest_value(client) <= chunk_mib << 20, "no Redis value is larger than one chunk"
    residual = keys.downlink_residual("big")
    assert blobs.sizes(client, residual)[0] > REDIS_VALUE_LIMIT, "the downlink residual is model-sized"
    assert client.llen(residual) > 1 + REDIS_VALUE_LIMIT // (chunk_mib << 20), "and chunked"
    # BENCHMARKS section 10: above idle, the aggregator under 4x the float32 model, a volunteer under 6x
    above = {pid: peak_bytes(pid) - base for pid, base in idle.items()}

    out = processes.home / "big.safetensors"
    result = processes.cli("export", "--run", "big", "--out", str(out))
    assert result.returncode == 0, result.stderr
    tensors = load_file(out)
    model = sum(t.numel() for t in tensors.values()) * 4
    assert model > REDIS_VALUE_LIMIT
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    # docs/BENCHMARKS.md section 10 records this line (pytest -rP shows it)
    peaks = ", ".join(
        f"{side} {above[pid] >> 20} MiB = {above[pid] / model:.2f}x"
        for side, pid in (("aggregator", aggregator.pid), ("volunteer", volunteer.pid))
    )
    print(
        f"{model / 4 / 1e6:.0f}M-parameter round, {init['compression']} both ways: "
        f"{seconds:.1f} s from post to version 1; "
        f"peak above idle: {peaks} the float32 model ({model >> 20} MiB)"
    )
    assert above[aggregator.pid] < 4 * model, (
        f"aggregator peaked {above[aggregator.pid] / model:.2f}x the model"
    )
    assert above[volunteer.pid] < 6 * model, f"volunteer peaked {above[volunteer.pid] / model:.2f}x the model"


def _largest_value(client) -> int:
    """The largest string or list element under crowdtrain's keys, read one at a time."""
    largest = 0
    for key in client.scan_iter("ct:*"):
        kind = client.type(key)
        if kind == b"string":
            largest = max(largest, client.strlen(key))
        elif kind == b"list":
            largest = max(largest, *(len(client.lindex(key, i) or b"") for i in range(client.llen(key))))
    return largest
