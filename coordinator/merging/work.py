"""Proof of work done (``init --work-check RATE``): a random sample of shards replayed on the trusted side.

Probe judging measures whether a delta helps, not whether the volunteer did
the work it claims: one local step claiming ten, or a delta copied from
another volunteer, passes it. So after a round's uploads are in, the
aggregator draws shards with ``secrets`` (a volunteer cannot know which of its
shards will be checked) and replays each drawn one on the CPU: the same base
model, the same batches (the job's ``shard`` from ``seed_for(run, round,
shard)``), the claimed number of steps, a fresh inner optimizer. The upload is
compared with the replay by cosine and relative norm (``mismatch``), on the
tensors the run's codec sends without a sparse top-k (error feedback makes a
top-k upload depend on the volunteer's earlier shards, not on this one). A
shard that fails is rejected with a reason containing ``work``, together with
its volunteer's other shards of the round.

Rates (``check_rate``): an identity with ``n`` merged shards is checked with
probability ``max(RATE, min(1, 2 / (n + 2)))``: its first shard always, then
2/3, 1/2, ... down to ``RATE``. A failed check costs the volunteer its whole
record (``forfeit``: accepted and samples back to 0, reputation 0), so it is
on probation again. Cheating one shard gains at most that shard's credit
(1) and loses ``n`` with probability ``r``: ``1 - r (n + 1) < 0`` for every
``n >= 1`` (docs/SECURITY.md has the arithmetic).

The replay needs a shard the trusted side can reproduce: the job's own data
(not ``init --data volunteer``) and an inner optimizer that starts afresh
(``--inner-state reset``); ``init`` refuses the flag otherwise. CPU thread
counts and GPUs are not bit-reproducible, hence tolerances (measured in
docs/BENCHMARKS.md), not equality; bf16 autocast is not reproducible within
any, so in a work-checked run a CUDA volunteer trains in float32 too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from broker import keys
from broker.run_config import RunConfig
from coordinator.merging.judging import ReadDelta, Rejection, voices
from jobs import Job, batch_size, parameter_groups
from jobs.interface import seed_for
from serialization import TensorDict, parse_codec
from serialization.codecs import SparseCodec

log = logging.getLogger("crowdtrain.work")

# An upload matches its replay when their cosine is at least WORK_COSINE and neither norm is
# more than WORK_NORM_RATIO times the other. Honest CPU replays measured cosine 1 - 2e-9 and
# norm ratio 1.000 (any thread counts); the cheats nearest to passing, half the claimed steps,
# cosine up to 0.976 and norm ratio up to 0.83; another shard's data cosine up to 0.90
# (docs/BENCHMARKS.md). bf16 autocast is not replayable within any tolerance: on this
# machine's CPU (the volunteer under bf16 autocast on 2 threads, a bf16 replay on 1) honest gpt
# nano shards measured cosine 0.58-0.99 and another shard's data 0.03-0.82 (section 22), so in
# a work-checked run volunteers train in float32 (``RunConfig.autocast``), as the replay does.
# A GPU's float32 kernels against the CPU's are not measured (no device).
WORK_COSINE = 0.99
WORK_NORM_RATIO = 1.1
# A shard whose upload is under LAZY_NORM x the median of the round's other uploads that claim
# as many steps is replayed whatever the draw: doing fewer steps than claimed shortens a delta.
# Compared on the whole upload and on the tensors the codec sends without top-k (when they hold
# at least DENSE_ENOUGH values), which carry none of error feedback's residuals: a veteran that
# turns lazy still uploads its honest past's residual in its top-k tensors (half the steps:
# up to 0.955 of the others whole), not in the rest (at most 0.77). On the job matrix
# (docs/BENCHMARKS.md section 22) honest uploads measured 0.857-1.145 of the others' median
# whole and 0.824-1.159 dense; half the steps at most 0.66 whole (lazy from the start) and
# 0.77 dense, one step 0.23 and 0.41. A mark costs a replay, never a rejection: an honest shard
# marked by mistake passes its check. click's one dense value (a bias) is noise, hence the floor.
LAZY_NORM = 0.8
DENSE_ENOUGH = 16
GRAD_CLIP_NORM = 1.0  # as the volunteer's trainer clips


def check_rate(merged: int, rate: float) -> float:
    """How likely a shard of an identity with ``merged`` merged shards is checked (0 if off)."""
    if rate <= 0:
        return 0.0
    return max(rate, min(1.0, 2.0 / (max(0, merged) + 2)))


def draw(
    owners: Mapping[int, str], records: Mapping[str, int], rate: float, marked: Iterable[int] = ()
) -> list[int]:
    """The shards to check, drawn with ``secrets`` now that every upload is in, and every ``marked`` one."""
    chance = secrets.SystemRandom()
    always = set(marked)
    return sorted(
        s
        for s, name in owners.items()
        if s in always or chance.random() < check_rate(records.get(name, 0), rate)
    )


def short(
    norms: Mapping[int, float],
    metas: Mapping[int, Mapping[str, Any]],
    dense: Mapping[int, float] | None = None,
) -> set[int]:
    """Shards whose upload is under ``LAZY_NORM`` x the median of the round's others claiming as many
    steps, on its whole ``norms`` or on its ``dense`` ones (``dense_norm``, where measured).

    A sandbagger's mark, cheap to take: a veteran checked at RATE is otherwise
    caught cheating with probability RATE a shard. One that scales its short
    delta up to the usual length is not marked; only the random draw finds it
    (docs/SECURITY.md).
    """
    claims = {shard: (metas.get(shard) or {}).get("steps") for shard in norms}
    found = set()
    for sizes in (norms, dense or {}):
        for shard, size in sizes.items():
            others = [sizes[o] for o in sizes if o != shard and claims.get(o) == claims.get(shard)]
            if others and size < LAZY_NORM * statistics.median(others):
                found.add(shard)
    return found


def dense_norm(upload: Mapping[str, torch.Tensor], codec: str) -> float | None:
    """The norm of the tensors ``codec`` sends without top-k (None under ``DENSE_ENOUGH`` values)."""
    chosen = parse_codec(codec)
    total, values = 0.0, 0
    for tensor in upload.values():
        if tensor.is_floating_point() and not isinstance(
            chosen.for_tensor(tensor.numel(), True), SparseCodec
        ):
            total += float(tensor.double().pow(2).sum())
            values += tensor.numel()
    return math.sqrt(total) if values >= DENSE_ENOUGH else None


def replay(
    job: Job,
    base: Mapping[str, torch.Tensor],
    *,
    shard: int,
    shards: int,
    steps: int,
    lr: float,
    optimizer: str,
    seed: int,
    bf16: bool = False,
) -> tuple[TensorDict, int]:
    """Train ``steps`` steps of shard ``shard`` from ``base`` as a volunteer with a fresh optimizer does.

    The same math as ``volunteer.trainer.train_shard`` on the CPU (a test holds the
    two equal); torch's global RNG, which the job's batches come from, is restored
    after. With ``bf16`` the loss is computed under the CPU's bfloat16 autocast (as
    a CUDA volunteer's is under CUDA's, outside work-checked runs): to measure how
    far such a shard drifts (``bench/work_matrix.py --bf16``). Returns the delta
    and the samples trained.
    """
    with torch.random.fork_rng(devices=[]):
        model = job.build_model()
        model.load_state_dict(base)
        model.train()
        initial = {k: v.detach().to(torch.float32, copy=True) for k, v in model.state_dict().items()}
        groups = parameter_groups(job, model)
        opt: torch.optim.Optimizer
        if optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=lr)
        else:
            try:
                opt = torch.optim.AdamW(groups, lr=lr, fused=True)
            except (RuntimeError, ValueError):
                opt = torch.optim.AdamW(groups, lr=lr)
        torch.random.default_generator.manual_seed(seed)
        batches = _cycle(job, shard % shards, shards)
        samples = 0
        for _ in range(steps):
            batch = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = job.loss(model, batch)
            if not math.isfinite(float(loss.detach())):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            opt.step()
            samples += min(_samples(job, batch), batch_size(job))
        with torch.no_grad():
            delta = {
                k: v.detach().to(torch.float32) - initial[k]
                for k, v in model.state_dict().items()
                if v.is_floating_point()
            }
    return delta, samples


def similarity(
    upload: Mapping[str, torch.Tensor], replayed: Mapping[str, torch.Tensor], codec: str
) -> tuple[float, float] | None:
    """(cosine, upload norm / replay norm) over the tensors ``codec`` sends without top-k; None if none."""
    chosen = parse_codec(codec)
    dot = up = re = 0.0
    compared = 0
    for name, mine in replayed.items():
        theirs = upload.get(name)
        if theirs is None or not mine.is_floating_point():
            continue
        if isinstance(chosen.for_tensor(mine.numel(), True), SparseCodec):
            continue  # top-k with error feedback: the upload holds earlier shards' residuals
        x, y = theirs.detach().double().flatten(), mine.double().flatten()
        if x.shape != y.shape:
            return 0.0, math.inf
        dot, up, re = dot + float(x @ y), up + float(x @ x), re + float(y @ y)
        compared += mine.numel()
    if not compared:
        return None
    if up == 0.0 and re == 0.0:
        return 1.0, 1.0
    cosine = dot / max(math.sqrt(up * re), 1e-300)
    return cosine, math.sqrt(up) / max(math.sqrt(re), 1e-300)


def mismatch(
    upload: Mapping[str, torch.Tensor], replayed: Mapping[str, torch.Tensor], codec: str
) -> str | None:
    """Why an upload is not the replayed training (None if it matches within the tolerance)."""
    seen = similarity(upload, replayed, codec)
    if seen is None:
        return None
    cosine, ratio = seen
    if cosine >= WORK_COSINE and 1 / WORK_NORM_RATIO <= ratio <= WORK_NORM_RATIO:
        return None
    return f"cosine {cosine:.3f} with the trusted replay, norm {min(ratio, 1e6):.3g}x the replay's"


@dataclass
class Checked:
    """What one round's work checks found and cost."""

    rejections: list[Rejection]
    shards: int = 0  # shards replayed
    marked: int = 0  # of them, drawn because their upload was ``short``
    steps: int = 0  # optimizer steps replayed
    seconds: float = 0.0


def check_work(
    job: Job,
    config: RunConfig,
    run: str,
    number: int,
    shards: int,
    base: TensorDict,
    used: dict[int, str],
    metas: dict[int, dict],
    records: Mapping[str, int],
    read: ReadDelta,
    norms: Mapping[int, float] | None = None,
) -> Checked:
    """Replay a random sample of the round's accepted shards; every shard of a volunteer that fails goes.

    The sample: each shard at its volunteer's ``check_rate``, and every shard
    whose upload is ``short`` against the round's others (``norms``: each
    accepted shard's, as the intake recorded them). Failing shards (and their
    volunteers' other shards) are removed from ``used``.
    """
    started = time.perf_counter()
    owners = {s: keys.volunteer_of(k) for s, k in used.items()}
    found = Checked([])
    cheats: dict[str, str] = {}
    limit = config.local_steps
    marked = _short(used, metas, norms, read, str(config.compression)) if norms else set()
    found.marked = len(marked)
    for shard in draw(owners, records, config.work_check, marked):
        name = owners[shard]
        if name in cheats:
            continue
        meta = metas.get(shard) or {}
        steps = meta.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= limit:
            cheats[name] = f"work: shard {shard} claims {steps!r} steps, the run trains 1 to {limit}"
            continue
        upload = read(used[shard], {}, shard)
        if upload is None:
            continue
        try:
            replayed, samples = replay(
                job,
                base,
                shard=shard,
                shards=shards,
                steps=steps,
                lr=config.lr,
                optimizer=str(config.optimizer),
                seed=seed_for(run, number, shard),
            )
        except Exception as e:  # the job's own failure on the trusted side: no verdict on the volunteer
            log.warning(
                "%s round %d: could not replay shard %d: %s: %s", run, number, shard, type(e).__name__, e
            )
            continue
        found.shards, found.steps = found.shards + 1, found.steps + steps
        why = mismatch(upload, replayed, str(config.compression))
        claimed = int(meta.get("samples") or 0)
        if why is None and claimed > samples:
            why = f"claims {claimed} samples, the replay of {steps} steps trained {samples}"
        if why is not None:
            cheats[name] = f"work: shard {shard} does not match its training ({why})"
    for name, shards_of in voices(used).items():
        if name in cheats:
            found.rejections += [(shard, name, cheats[name]) for shard in shards_of]
    for shard, _, _ in found.rejections:
        used.pop(shard, None)
    found.seconds = time.perf_counter() - started
    return found


def _short(
    used: dict[int, str], metas: dict[int, dict], norms: Mapping[int, float], read: ReadDelta, codec: str
) -> set[int]:
    """``short`` on the round's accepted shards: their recorded norms, and each one's ``dense_norm``
    (one more decode of each upload: a work-checked round replays shards, which cost far more)."""
    dense: dict[int, float] = {}
    for shard, key in used.items():
        upload = read(key, {}, shard)
        size = dense_norm(upload, codec) if upload is not None else None
        if size is not None:
            dense[shard] = size
    return short({s: norms[s] for s in used if s in norms}, metas, dense)


def summary(checked: Checked) -> dict[str, Any]:
    """The round summary's account of its work checks: shards and steps replayed (of them, the shards
    marked ``short``), seconds spent."""
    return {
        "work_checked": checked.shards,
        "work_marked": checked.marked,
        "work_steps": checked.steps,
        "work_seconds": round(checked.seconds, 3),
    }


def records(redis: Any, names: list[str]) -> dict[str, int]:
    """Each volunteer's merged shards (its ``accepted`` credit): how far along its probation is."""
    pipe = redis.pipeline()
    for name in names:
        pipe.hget(keys.volunteer(name), "accepted")
    return {name: int(raw or 0) for name, raw in zip(names, pipe.execute())}


def forfeit(redis: Any, names: set[str]) -> None:
    """A failed work check costs the volunteer its record: credit back to 0, reputation 0."""
    for name in sorted(names):
        key = keys.volunteer(name)
        pipe = redis.pipeline()
        pipe.hset(key, mapping={"accepted": 0, "samples": 0, "reputation": "0.0"})
        pipe.hincrby(key, "work_failed", 1)
        pipe.execute()


def _cycle(job: Job, shard: int, shards: int) -> Iterator[Any]:
    while True:
        empty = True
        for batch in job.shard(shard, shards):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"job {job.name!r} yielded no batches for shard {shard} of {shards}")


def _samples(job: Job, batch: Any) -> int:
    counter: Callable[[Any], int] | None = getattr(job, "batch_samples", None)
    if callable(counter):
        return int(counter(batch))
    first = batch
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    if isinstance(first, Mapping):
        first = next(iter(first.values()), None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return 1
    return int(first.shape[0])
