"""The job interface (README, "Your own job") and the error family of jobs.

A job is what a run trains: model, data shards, loss and evaluation. Both the
trusted aggregator and untrusted volunteers use it, so it imports nothing of
either side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch

REQUIRED_METHODS = ("build_model", "shard", "loss", "evaluate")
# Samples one training step counts for when a job declares no ``batch_size``.
DEFAULT_BATCH_SIZE = 1


class JobError(ValueError):
    """A job that cannot be loaded or configured; the message names the fix."""


@runtime_checkable
class Job(Protocol):
    """What ``factory(**job_args)`` returns.

    Optional: ``batch_size`` (int), the most samples one training step sees. A
    shard's sample count weighs its delta in the merge, so the aggregator caps
    it at ``local_steps * batch_size``; a job without one counts each step as
    one sample (``DEFAULT_BATCH_SIZE``), so no volunteer can claim more.
    Optional: ``local_shard(path) -> Iterable[batch]``, batches from a
    volunteer's own data (``volunteer start --data PATH``), which never
    leaves its machine: only deltas do.
    Optional: ``probe_batches() -> list[batch]``, a small fixed set of batches
    on which the aggregator weighs each delta's effect (``init --verify
    probe``); without it, its ``evaluate`` gives the probe loss.
    Optional: ``reuse_model = True`` says the model holds nothing beyond its
    ``state_dict`` but constants (no Python attributes or non-persistent
    buffers that training changes), so a volunteer process may load the next
    shard's weights into the model it trained before instead of building one
    per shard (a random initialisation of the whole model thrown away).
    Optional: ``parameter_groups(model) -> list[dict]``, the inner optimizer's
    parameter groups (torch's format: ``{"params": [...], "weight_decay": x}``),
    each trainable parameter in exactly one; without it, matrices and
    embeddings decay and biases and norm gains do not (``parameter_groups``).
    Optional: ``outputs``, what the model's output is, so runs of the job can be
    ensembled (``coordinator fuse --method ensemble``): ``"logits"``, scores over
    the last dimension whose softmax is the prediction (a classifier), or
    ``"next-token"``, a language model taking ids ``[batch, time]`` to logits
    ``[batch, time, vocab]`` where position t predicts id t+1 (which also allows
    weights by posterior). Without it, a job's runs can be averaged, not ensembled.
    Optional: ``slices(model, count) -> list[list[str]]``, the ``count`` slices a
    run of ``init --slices count`` trains one per shard: lists of ``state_dict``
    names that together hold each floating-point entry exactly once, none empty
    (``jobs.slicing.check``); without it the entries are cut in ``state_dict``
    order into slices balanced by parameter count (``jobs.slicing.by_blocks``
    cuts between layers, as the built-in jobs do).
    Optional: ``evaluate_corpus(model, path) -> dict[str, float]``, the metrics of
    ``evaluate`` on the data at ``path`` instead of the held-out set
    (``coordinator evaluate --data PATH``).
    """

    name: str

    def build_model(self) -> torch.nn.Module:
        """Return a fresh model; the same seed gives the same initial weights."""
        ...

    def shard(self, index: int, count: int) -> Iterable[Any]:
        """Yield training batches of shard ``index`` of ``count``, drawn from torch's global RNG."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Return the scalar training loss of ``model`` on ``batch``."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Return held-out metrics: ``eval_loss`` and optionally ``eval_accuracy``."""
        ...


def batch_size(job: object) -> int:
    """The most samples one step of ``job`` counts for: its ``batch_size``, else DEFAULT_BATCH_SIZE."""
    value = getattr(job, "batch_size", None)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return DEFAULT_BATCH_SIZE


def parameter_groups(job: object, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The inner optimizer's parameter groups: the job's own, or weight decay on matrices only.

    Decaying a bias or a norm's gain pulls it toward zero for no gain in
    generalisation (nanoGPT's rule: decay every parameter of two or more
    dimensions, none of the rest). A job's ``parameter_groups`` must hold each
    trainable parameter exactly once: JobError otherwise.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    hook = getattr(job, "parameter_groups", None)
    if not callable(hook):
        decay = [p for p in trainable if p.dim() >= 2]
        rest = [p for p in trainable if p.dim() < 2]
        plain: list[dict[str, Any]] = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
        return [group for group in plain if group["params"]]
    groups: list[dict[str, Any]] = list(hook(model))
    seen: list[int] = []
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
            raise JobError("parameter_groups must return dicts, each with a 'params' list")
        seen += [id(p) for p in group["params"]]
    if sorted(seen) != sorted(id(p) for p in trainable):
        raise JobError("parameter_groups must hold each trainable parameter of the model exactly once")
    return groups


def seed_for(run: str, round: int, shard: int) -> int:
    """Stable 63-bit seed for (run, round, shard): fresh batches each round, same on redelivery.

    Both sides know it: the volunteer trains a shard from it, the trusted side replays one
    (``coordinator.merging.work``).
    """
    key = f"{run}\x00{round}\x00{shard}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"crowdtrain").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def reuses_model(job: object) -> bool:
    """True when ``job`` declares ``reuse_model = True``: its model may train shard after shard."""
    return getattr(job, "reuse_model", False) is True


OUTPUT_KINDS = ("logits", "next-token")


def outputs_of(job: object) -> str | None:
    """What ``job``'s model outputs, if it says (one of OUTPUT_KINDS); None: nothing to mix."""
    value = getattr(job, "outputs", None)
    return value if value in OUTPUT_KINDS else None


def reads_local_data(job: object) -> bool:
    """True when ``job`` can train on a volunteer's own data (it has ``local_shard``)."""
    return callable(getattr(job, "local_shard", None))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build a model under ``seed``: same seed, same weights, the global RNG left as it was.

    Only the CPU generator is seeded (and restored): models are built on the
    CPU. ``torch.manual_seed`` would also seed every accelerator, which
    ``fork_rng(devices=[])`` does not restore, and queue a formatted stack
    trace per accelerator not yet in use: about 0.5 ms a shard in a worker's
    deep stack, measured, for generators a build never uses.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
