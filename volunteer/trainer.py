"""The volunteer's local trainer: a few optimizer steps on one shard, returned as a delta.

``train_shard`` builds the job's model, loads the global weights, seeds torch's
global RNG (so the job's shard batches are reproducible for a given seed: a
redelivered shard trains the same batches again), trains ``steps`` steps and
returns ``local - initial`` for every floating-point entry of the model's
``state_dict`` (float32, CPU), formed in the trained model's own storage on the
CPU so a volunteer holds no extra model-sized copy for it. Integer buffers (e.g. BatchNorm's
``num_batches_tracked``) carry no delta and are left out. With ``init --inner-state
keep`` the optimizer starts from the state the volunteer's previous shard left.

A ``gate`` is called between two steps: it may sleep (``--cpu-limit``), block
while the volunteer is paused (saving the shard's ``ShardState`` first), or
raise ``ShardDropped`` when the shard is no longer this volunteer's. A shard
given its saved ``resume`` state goes on from that step: same weights,
optimizer, data position and RNG, so it trains what it would have without the
pause.

Gradients are clipped to a global norm of 1.0, a guard against one bad batch
blowing up a volunteer's delta. On CUDA the forward pass runs under bf16
autocast. A non-finite loss stops training early; the caller checks the result's
``train_loss`` and delta for finiteness and reports the shard failed.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from jobs import Job, batch_size, parameter_groups
from jobs.interface import seed_for as seed_for  # the shard's seed: the trusted side replays from it too
from serialization import TensorDict
from volunteer import slicing
from volunteer.checkpoint import ShardState
from volunteer.feedback import Consumable

GRAD_CLIP_NORM = 1.0
OPTIMIZERS = ("adamw", "sgd")

# gate(steps done, the shard's state on demand) -> seconds it held training back (paused)
Gate = Callable[[int, Callable[[], ShardState]], float]


class ShardDropped(Exception):
    """Raised by a gate: the shard stopped being this volunteer's (its lease went, its round closed)."""


@dataclass
class ShardResult:
    """What one shard's local training produced, before encoding."""

    delta: TensorDict
    train_loss: float
    samples: int
    steps: int
    seconds: float
    optimizer_state: dict[str, Any] | None = None  # the inner optimizer's state after the last step


def preload() -> None:
    """Import ``torch._dynamo`` now, which the first optimizer a process makes would import (about 1-2 s).

    Every ``torch.optim.Optimizer`` method wrapped in ``torch._disable_dynamo``
    (``add_param_group``, which the constructor calls, and ``step``) imports it
    on its first call. A volunteer's worker calls this in its main process
    before the pool starts (``tasks.training.Preload``): prefork children
    inherit the module, and the first shard does not pay for it.
    """
    importlib.import_module("torch._dynamo")


def train_shard(
    job: Job,
    weights: Mapping[str, torch.Tensor],
    *,
    shard: int,
    shards: int,
    steps: int,
    lr: float,
    optimizer: str = "adamw",
    device: torch.device,
    seed: int,
    seconds: float | None = None,
    data: str | None = None,
    optimizer_state: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
    gate: Gate | None = None,
    resume: ShardState | None = None,
    trainable: frozenset[str] | None = None,
    autocast: bool = True,
) -> ShardResult:
    """Train ``steps`` local steps of ``job`` on shard ``shard`` of ``shards`` from ``weights``.

    With a time budget ``seconds``, training stops once that much time has passed
    (after at least one step), so a slow machine sends fewer samples, not a late delta.
    With ``data`` (a path on this machine) the batches come from ``job.local_shard(data)``.
    With ``optimizer_state`` (``init --inner-state keep``: the state this volunteer's
    previous shard of the run left) the inner optimizer goes on from it instead of
    from zero; one that does not fit this model and optimizer is ignored.
    With ``model`` (one this process built for ``job`` before, which declares
    ``reuse_model``) the weights are loaded into it instead of a new build; the
    delta is formed in its parameters, so it must not be trained again until
    the delta has been sent.
    With ``trainable`` (a sliced run: the tensors of this shard's slice) only
    those train and only their delta is returned; the others are frozen and,
    on the CPU, share the storage of ``weights`` (``volunteer.slicing``).
    Without ``autocast`` a CUDA device trains in float32 too (a work-checked run:
    the trusted side replays the shard in float32 on its CPU).
    """
    if steps < 1:
        raise ValueError(f"local steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    started = time.perf_counter()
    model = job.build_model() if model is None else model
    if trainable is None:
        model.load_state_dict(weights)
    else:
        slicing.bind(model, weights, trainable, device)
    model.to(device)
    model.train()
    initial = _base_copy(model, weights, trainable)
    groups = parameter_groups(job, model)
    if trainable is not None:
        groups = slicing.freeze(model, groups, trainable)
    opt = _make_optimizer(optimizer, lr, groups)
    if optimizer_state is not None:
        _resume(opt, optimizer_state, lr)
    _seed(seed, device)  # the job's shard batches come from the global RNG
    batches = _cycle(job, shard, shards, data)
    losses: list[float] = []
    samples = done = drawn = 0
    if resume is not None:
        model.load_state_dict(resume.weights)
        opt.load_state_dict(resume.optimizer)
        for _ in range(resume.drawn):  # the data position: the same batches, drawn again from the seed
            next(batches)
        torch.random.set_rng_state(resume.rng)
        losses, samples, done, drawn = list(resume.losses), resume.samples, resume.done, resume.drawn
        started -= resume.seconds

    def state() -> ShardState:
        return ShardState(
            weights=model.state_dict(),
            optimizer=opt.state_dict(),
            rng=torch.random.get_rng_state(),
            done=done,
            drawn=drawn,
            samples=samples,
            losses=list(losses),
            seconds=time.perf_counter() - started,
        )

    while done < steps:
        if gate is not None:
            started += gate(done, state)  # time paused is no training time
        if seconds is not None and done and time.perf_counter() - started >= seconds:
            break  # the time budget is spent: send what was trained
        batch = _to_device(next(batches), device)
        drawn += 1
        with _autocast(device) if autocast else contextlib.nullcontext():
            loss = job.loss(model, batch)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            break  # a diverged shard: the caller rejects it on train_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        opt.step()
        # never more than the job's batch_size: the aggregator's cap on a shard's samples
        samples += min(_batch_samples(job, batch), batch_size(job))
        done += 1
    opt.zero_grad(set_to_none=True)  # the gradients go before the delta is formed
    delta = _delta(model, initial)
    return ShardResult(
        delta=delta,
        train_loss=sum(losses) / len(losses),
        samples=samples,
        steps=done,
        seconds=time.perf_counter() - started,
        optimizer_state=opt.state_dict(),
    )


def _base_copy(
    model: torch.nn.Module, weights: Mapping[str, torch.Tensor], only: frozenset[str] | None = None
) -> TensorDict:
    """The loaded weights as float32 on the CPU, to subtract from after training.

    Where the caller's tensor already is exactly that (a CPU float32 model: the
    volunteer's cached version) it is used as it is, not copied: one model's
    size less at the volunteer's peak. It is only read. With ``only``, those tensors alone.
    """
    base: TensorDict = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or (only is not None and k not in only):
            continue
        given = weights.get(k)
        if given is not None and _cpu_float32(given) and _cpu_float32(v) and given.shape == v.shape:
            base[k] = given
        else:
            base[k] = v.detach().to("cpu", torch.float32, copy=True)
    return base


def _delta(model: torch.nn.Module, initial: TensorDict) -> TensorDict:
    """``local - initial`` per floating entry; formed in the trained weights where they are CPU float32.

    The model is not used after this, so its own storage can hold the delta:
    no second model-sized set of tensors at the peak. The delta is ``Consumable``:
    error feedback adds its residual into it rather than into a copy.
    """
    delta = Consumable()  # the caller's error feedback may add its residual in place
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k not in initial:
                continue
            if _cpu_float32(v):
                delta[k] = v.detach().sub_(initial[k])
            else:
                delta[k] = v.detach().to("cpu", torch.float32) - initial[k]
    return delta


def _cpu_float32(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu"


def _seed(seed: int, device: torch.device) -> None:
    """Seed torch's global RNG for this shard: on a CPU volunteer, the CPU generator only.

    ``torch.manual_seed`` also queues seeds for accelerators not yet in use,
    taking a formatted stack trace for each (``torch.cuda._lazy_call``): in a
    Celery worker's deep stack that cost about 1 ms a shard, for generators a
    CPU volunteer never uses. On an accelerator every generator is seeded.
    """
    if device.type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _make_optimizer(name: str, lr: float, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The inner optimizer of one shard (``init --optimizer adamw|sgd``) over the job's parameter groups."""
    if name == "adamw":
        # fused: one kernel per step, no model-sized temporaries (the foreach step allocates
        # about one model's size) and many times faster on the CPU; where a device has no
        # fused AdamW, the default implementation
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def _resume(opt: torch.optim.Optimizer, state: dict[str, Any], lr: float) -> None:
    """Load a previous shard's optimizer state (moments, step counts), keeping this run's lr."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, entry in dict(state.get("state") or {}).items():
        moments = [v for v in entry.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not 0 <= int(index) < len(params) or any(m.shape != params[int(index)].shape for m in moments):
            return  # another model: start afresh
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError):
        return  # another optimizer: start afresh
    for group in opt.param_groups:
        group["lr"] = lr


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (faster, and the delta is float32 anyway); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cycle(job: Job, shard: int, shards: int, data: str | None = None) -> Iterator[Any]:
    """Yield the shard's batches (or the local data's) forever, restarting a finite iterable."""
    while True:
        empty = True
        source = job.local_shard(data) if data is not None else job.shard(shard, shards)  # type: ignore[attr-defined]
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"job {job.name!r} yielded no batches for shard {shard} of {shards}")


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_samples(job: Job, batch: Any) -> int:
    """Samples in ``batch``: ``job.batch_samples`` if defined, else the first tensor's length."""
    counter = getattr(job, "batch_samples", None)
    if callable(counter):
        return int(counter(batch))
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        return 1  # a batch without a batched tensor counts as one sample
    return int(first.shape[0])


def _first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found depth-first in ``batch``, or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (tuple, list)) or isinstance(batch, Mapping):
        for value in values:
            found = _first_tensor(value)
            if found is not None:
                return found
    return None
