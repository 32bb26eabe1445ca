"""Creating a run: model version 0, the checks it must pass, and no half-created run left behind.

A model too large for this machine is a usage error before anything is
written (any size fits Redis: blobs are chunked, ``broker.blobs``); if Redis
refuses a write (full at maxmemory), what was written is removed again.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path

import msgpack
import redis
from safetensors import SafetensorError

from broker import keys
from broker.objects import ObjectStoreError
from broker.run_config import RunConfig
from coordinator.errors import BROKER_FULL, BrokerFull, UsageError, is_broker_full
from coordinator.runs import checkpoints
from coordinator.store import Store
from jobs import Job
from serialization import TensorDict, dumps

_PIPELINE_ECHO = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)


def build_model(job: Job, name: str, run: str) -> tuple[TensorDict, bytes, dict[str, float]]:
    """Model version 0, its wire bytes and its evaluation; a model too large is a UsageError."""
    try:
        model = job.build_model()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        blob = dumps(weights, {"run": run, "version": 0})
        initial = {k: float(v) for k, v in job.evaluate(model).items()}
    except (MemoryError, RuntimeError) as e:
        raise UsageError(
            f"job {name!r}: the model is too large for this machine ({first_line(e)[:200]}); "
            "choose smaller --job-arg values"
        ) from None
    return weights, blob, initial


def create_run(
    store: Store,
    home: Path,
    run: str,
    config: RunConfig,
    blob: bytes,
    weights: TensorDict,
    files: Mapping[str, str] | None = None,
) -> None:
    """Store the run in Redis, then version 0 (and ``files``, e.g. a tokenizer) on disk.

    If either is refused, what was written is removed.
    """
    try:
        store.create_run(run, config, blob)
    except ObjectStoreError:
        _forget_run(store, run, config)
        raise
    except redis.ResponseError as e:
        _forget_run(store, run, config)
        if is_broker_full(e):
            raise BrokerFull(f"{BROKER_FULL}; run {run!r} was not created") from None
        raise UsageError(f"the broker refused to store run {run!r}: {first_line(e)}") from None
    try:
        checkpoints.save_version(home, run, 0, weights, None, config)
        for name, text in (files or {}).items():
            checkpoints.save_text(home, run, name, text)
    except (OSError, SafetensorError) as e:
        _forget_run(store, run, config)
        folder = checkpoints.run_dir(home, run)
        raise UsageError(f"cannot write run {run!r}'s checkpoint under {folder}: {e}") from None


def _forget_run(store: Store, run: str, config: RunConfig) -> None:
    """Delete the keys ``init`` writes for ``run``, if the run's stored config is the one we wrote."""
    client = store.redis
    if client.get(keys.run_config(run)) != msgpack.packb(config.stored()):
        return  # we never wrote it (refused at once), or it is another coordinator's run
    objects = store.objects(run)
    if objects is not None:
        with contextlib.suppress(Exception):  # the store may be what failed: its objects are swept
            objects.delete_run(run)
    pipe = client.pipeline(transaction=False)  # Redis refuses any MULTI while it is over maxmemory
    pipe.srem(keys.runs(), run)
    pipe.delete(keys.model(run, 0), keys.run_version(run), keys.run_config(run))
    pipe.execute()


def first_line(error: BaseException) -> str:
    """The first line of an error's text (without a pipeline's echo of its command and arguments)."""
    text = _PIPELINE_ECHO.sub("", str(error).strip())
    lines = text.splitlines()
    return lines[0][:300] if lines else type(error).__name__
