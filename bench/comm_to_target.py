"""Communication to a target loss on charlm: uplink + downlink bytes of sync fp32, FedAvg, DiLoCo, top-k.

    python bench/comm_to_target.py [--model 1m] [--steps 300] [--seeds 3] [--processes 2] [--configs ...]

Simulated in one process with crowdtrain's own pieces, so it is fast and deterministic: the
job from ``jobs.load_job`` (``--model 1m``: charlm layers=2 width=200, 1.07M parameters;
``--model tiny``: the 85K-parameter model of the first version of this benchmark), local
training by ``volunteer.trainer.train_shard`` (optionally with ``optimizer_state``: the
``--inner-state keep`` of a volunteer), uploads encoded by ``volunteer.feedback.ErrorFeedback``
(one per simulated volunteer, so top-k keeps its residuals), decoded by ``serialization.loads``,
merged by ``coordinator.merging.strategies`` and, with a lossy downlink codec, published by
``coordinator.merging.downlink.publish`` (the next round trains from the published version, the base
moved by the decoded update, as volunteers rebuild it). No Redis.

Bytes. Uplink: ``len(blob)`` of every upload. Downlink: every worker first fetches the whole
fp32 model (``len(dumps(weights))``: crowdtrain volunteers fetch version 0, they do not build
it), then after each round either the whole new model again (lossless downlink) or only the
encoded update ``len(update)`` (lossy downlink: every worker holds the previous version, since
all train every round, stragglers included). Sync fp32 data-parallel: per step each worker
uploads its fp32 gradient and receives the fp32 *averaged gradient* back (one message of the
same size; receiving the new fp32 weights would cost the same), after the initial model fetch.
The "total" is uplink + downlink.

* centralized: one process, batch ``workers x batch`` (the global batch), ``--steps`` AdamW
  steps. Its eval loss at the end of that sample budget is the seed's target.
* sync fp32 data-parallel: every step each worker encodes its fp32 gradient (batch ``batch``,
  its own shard), the server averages them and takes one AdamW step: mathematically
  centralized training, paying one gradient-sized message per worker per step each way.
* local-step configurations (``--configs``): rounds of H local steps per worker, encoded
  uploads, one strategy merge. Named ones: ``fedavg``, ``diloco``, ``diloco-int8`` (int8 up
  and down, crowdtrain's default downlink being the run's codec), ``best`` (``BEST`` below),
  ``best-quorum`` (the same, 4 train, 3 merged), and the older ``diloco-topk``, ``fedavg-topk``,
  ``diloco-topk-decay``. Any other is a spec ``STRATEGY[/h=N][/up=CODEC][/down=CODEC]
  [/inner=keep|reset][/slr=X][/mom=X][/quorum=K]``, e.g. ``fedavg/h=30/up=topk:0.01+int2``.
* quorum K of ``workers``: every round all workers train and upload, but the round closes with
  the first K; the stragglers follow a fixed rotating pattern (in round r, worker ``(r + i) mod workers``
  arrives i-th).
  Its upload is wasted: it is counted in the uplink (and reported apart); its samples are not
  counted, so the budget is reached after more rounds, and its error-feedback residual has been
  charged as if sent (what a volunteer whose upload came too late would hold).

Every configuration may run on past the budget (up to ``--max-budget`` times it) until it
reaches the target; "loss at budget" is its eval loss at exactly the centralized sample count
(interpolated between rounds when a round does not end on it: quorum rows). With ``--seeds N``
every seed (model init, batches) has its own centralized run and target; the table shows the
means and the per-seed range. The plot (``--plot``, default ``docs/img/comm_to_target.png``)
shows the first seed: eval loss against cumulative total bytes (log x) and against samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging.downlink import lossy, publish, read_residual  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from jobs import load_job  # noqa: E402
from serialization import dumps, loads, parse_codec  # noqa: E402
from volunteer.feedback import ErrorFeedback  # noqa: E402
from volunteer.trainer import GRAD_CLIP_NORM, seed_for, train_shard  # noqa: E402

GOAL_REDUCTION = 1000.0
GOAL_LOSS_GAP = 0.03
BEST = "fedavg/h=10/up=topk:0.01+int2/down=topk:0.01+int2/inner=keep"
DEFAULT_CONFIGS = "sync,fedavg,diloco,diloco-int8,best,best-quorum"
MODELS = {  # --model: charlm shapes
    "1m": {"layers": 2, "width": 200, "heads": 4, "context": 32},  # 1,074,400 parameters
    "tiny": {"layers": 1, "width": 64, "heads": 4, "context": 32},  # 85K, the first version's
}
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Plan:
    """One local-step configuration."""

    key: str
    strategy: str = "fedavg"
    h: int = 50
    up: str = "none"
    down: str = "none"
    inner: str = "reset"
    server_lr: float | None = None
    momentum: float | None = None
    quorum: int | None = None
    decay: float | None = None  # what-if: error feedback whose residual decays (diloco-topk-decay)
    label: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        parts = [f"{self.strategy} H={self.h}"]
        if self.server_lr is not None or self.momentum is not None:
            parts.append(
                "("
                + ", ".join(
                    f"{k} {v}" for k, v in (("lr", self.server_lr), ("mom", self.momentum)) if v is not None
                )
                + ")"
            )
        if self.up != "none" or self.down != "none":
            parts.append(f"up {self.up}" + (" (EF)" if parse_codec(self.up).lossy else ""))
            parts.append(f"down {self.down}")
        if self.inner == "keep":
            parts.append("inner state kept")
        if self.quorum:
            parts.append(f"quorum {self.quorum}")
        return ", ".join(parts)


def parse_plan(spec: str, h: int) -> Plan:
    """A named configuration or ``STRATEGY[/key=value...]`` (module docstring)."""
    named = {
        "fedavg": "fedavg",
        "diloco": "diloco",
        "diloco-int8": "diloco/up=int8/down=int8",
        "best": BEST,
        "best-quorum": BEST + "/quorum=3",
        "diloco-topk": "diloco/up=topk:0.01+int8",
        "fedavg-topk": "fedavg/up=topk:0.01+int8",
        "diloco-topk-decay": "diloco/up=topk:0.01+int8/decay=0.9",
    }
    text = named.get(spec, spec)
    strategy, *pairs = text.split("/")
    plan = Plan(key=spec, strategy=strategy, h=h)
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep:
            raise SystemExit(f"--configs: {spec!r}: expected key=value, got {pair!r}")
        if k == "h":
            plan = replace(plan, h=int(v))
        elif k in ("up", "down"):
            parse_codec(v)
            plan = replace(plan, **{k: v})
        elif k == "inner":
            if v not in ("keep", "reset"):
                raise SystemExit(f"--configs: {spec!r}: inner is keep or reset")
            plan = replace(plan, inner=v)
        elif k in ("slr", "mom", "decay"):
            plan = replace(plan, **{{"slr": "server_lr", "mom": "momentum"}.get(k, k): float(v)})
        elif k in ("quorum", "q"):
            plan = replace(plan, quorum=int(v))
        else:
            raise SystemExit(f"--configs: {spec!r}: unknown key {k!r}")
    make_strategy(plan.strategy, server_lr=plan.server_lr, momentum=plan.momentum)  # validate early
    if plan.decay is not None:
        plan = replace(plan, label=f"{plan.name}, feedback decay {plan.decay} (what-if)")
    return plan


@dataclass
class Curve:
    """One configuration's eval-loss trajectory against bytes and samples (one seed)."""

    name: str
    key: str = ""
    points: list[tuple[int, int, int, float]] = field(default_factory=list)  # (up, down, samples, loss)
    upload_bytes: int = 0  # bytes of one worker's (last) upload
    update_bytes: int = 0  # bytes of one worker's (last) per-round fetch
    rounds_to_target: int | None = None
    up_to_target: int | None = None
    down_to_target: int | None = None
    wasted_to_target: int = 0  # stragglers' uploads (included in up_to_target)
    samples_to_target: int | None = None
    loss_at_budget: float | None = None
    seconds: float = 0.0

    @property
    def total_to_target(self) -> int | None:
        return None if self.up_to_target is None else self.up_to_target + (self.down_to_target or 0)


def job_args(args: argparse.Namespace, batch: int, seed: int) -> dict:
    return {**MODELS[args.model], "batch_size": batch, "eval_batches": args.eval_batches, "seed": seed}


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def centralized(args, job, eval_job, budget: int, seed: int) -> Curve:
    """Single-process AdamW on the global batch; evaluated every ``eval_every`` steps."""
    curve = Curve("centralized", key="centralized")
    model = job.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.manual_seed(seed)
    batches = iter(job.shard(0, 1))
    curve.points.append((0, 0, 0, eval_job.evaluate(model)["eval_loss"]))
    for step in range(1, args.steps + 1):
        loss = job.loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.points.append((0, 0, step * job.batch_size, eval_job.evaluate(model)["eval_loss"]))
    curve.loss_at_budget = curve.points[-1][3]
    assert curve.points[-1][2] == budget
    return curve


def sync_dp(args, job, target: float, budget: int, seed: int, model_bytes: int) -> Curve:
    """Every step: each worker uploads its fp32 gradient and gets the fp32 average back."""
    curve = Curve("sync fp32 data-parallel (H=1)", key="sync")
    model = job.build_model()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.manual_seed(seed)
    shards = [iter(job.shard(i, args.workers)) for i in range(args.workers)]
    up = samples = 0
    down = args.workers * model_bytes  # the initial model
    curve.points.append((0, down, 0, job.evaluate(model)["eval_loss"]))
    step = 0
    while True:
        step += 1
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for worker, batches in enumerate(shards):
            batch = next(batches)
            model.zero_grad(set_to_none=True)
            job.loss(model, batch).backward()
            grads = {k: p.grad for k, p in params.items()}
            blob = dumps(grads, {"round": step, "shard": worker, "samples": len(batch[0])})
            up += len(blob)
            curve.upload_bytes = curve.update_bytes = len(blob)
            for k, g in loads(blob)[0].items():
                total[k].add_(g)
            samples += len(batch[0])
        down += args.workers * curve.upload_bytes  # the averaged fp32 gradient, to every worker
        for k, p in params.items():
            p.grad = total[k].div_(args.workers)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        opt.step()
        if step % args.eval_every == 0 or samples == budget:
            loss = job.evaluate(model)["eval_loss"]
            curve.points.append((up, down, samples, loss))
            if _record(curve, loss, target, up, down, 0, samples, budget, step, args):
                return curve


class DecayingFeedback(ErrorFeedback):
    """What-if (not in the library): error feedback whose residual decays by ``beta`` per round.

    SparseLoCo (arXiv 2508.15706) decays the error buffer; without it, residual mass that top-k
    keeps re-sending piles up and, with DiLoCo's outer momentum, overshoots. Reaches into
    ErrorFeedback's private buffers, so it lives here as an experiment only.
    """

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        self.beta = beta

    def encode(self, delta, meta, codec):
        for residual in self._residual.values():
            residual.mul_(self.beta)
        return super().encode(delta, meta, codec)


def local_sgd(args, job, plan: Plan, target: float, budget: int, seed: int, model_bytes: int) -> Curve:
    """Rounds of H local steps per worker (train_shard), encoded uploads, merge, publish."""
    curve = Curve(plan.name, key=plan.key)
    up_codec = parse_codec(plan.up)
    weights = weights_of(job.build_model())
    merge = make_strategy(plan.strategy, server_lr=plan.server_lr, momentum=plan.momentum)
    if plan.decay is not None:
        feedback = [DecayingFeedback(plan.decay) for _ in range(args.workers)]
    else:
        feedback = [ErrorFeedback() for _ in range(args.workers)]
    states: list[dict | None] = [None] * args.workers
    residual = None  # the downlink residual the aggregator keeps
    model = job.build_model()
    run = plan.name if seed == 0 else f"{plan.name} seed {seed}"
    up = wasted = samples = 0
    down = args.workers * model_bytes  # every worker fetches version 0 whole
    curve.points.append((0, down, 0, job.evaluate(model)["eval_loss"]))
    rnd = 0
    while True:
        rnd += 1
        deltas = []
        for worker in range(args.workers):
            result = train_shard(
                job,
                weights,
                shard=worker,
                shards=args.workers,
                steps=plan.h,
                lr=args.lr,
                optimizer="adamw",
                device=CPU,
                seed=seed_for(run, rnd, worker),
                optimizer_state=states[worker] if plan.inner == "keep" else None,
            )
            states[worker] = result.optimizer_state
            meta = {
                "run": "bench",
                "round": rnd,
                "shard": worker,
                "base_version": rnd - 1,
                "samples": result.samples,
                "train_loss": result.train_loss,
                "steps": result.steps,
                "seconds": round(result.seconds, 3),
                "volunteer": f"w{worker}",
            }
            blob = feedback[worker].encode(result.delta, meta, up_codec)
            up += len(blob)
            curve.upload_bytes = len(blob)
            if plan.quorum and (worker - rnd) % args.workers >= plan.quorum:
                wasted += len(blob)  # a straggler: the round closed without it
                continue
            samples += result.samples
            delta, got = loads(blob)
            deltas.append((float(got["samples"]), delta))
        base = {k: v.clone() for k, v in weights.items()}
        merged = merge.aggregate(weights, iter(deltas))
        if lossy(plan.down):
            meta = {"run": "bench", "version": rnd, "base_version": rnd - 1}
            weights, update, left = publish(base, merged, residual, plan.down, meta)
            residual = read_residual(left)
            curve.update_bytes = len(update)
        else:
            weights = merged
            curve.update_bytes = model_bytes
        down += args.workers * curve.update_bytes  # every worker holds version rnd - 1
        model.load_state_dict(weights)
        loss = job.evaluate(model)["eval_loss"]
        curve.points.append((up, down, samples, loss))
        if _record(curve, loss, target, up, down, wasted, samples, budget, rnd, args):
            return curve


def _record(
    curve: Curve,
    loss: float,
    target: float,
    up: int,
    down: int,
    wasted: int,
    samples: int,
    budget: int,
    rounds: int,
    args,
) -> bool:
    """Note the first crossing of the target and the loss at budget; True when done."""
    if curve.up_to_target is None and loss <= target:
        curve.up_to_target, curve.down_to_target, curve.wasted_to_target = up, down, wasted
        curve.samples_to_target, curve.rounds_to_target = samples, rounds
    if curve.loss_at_budget is None and samples >= budget:
        (_, _, s0, l0), (_, _, s1, l1) = curve.points[-2], curve.points[-1]
        curve.loss_at_budget = l1 if s1 in (budget, s0) else l0 + (l1 - l0) * (budget - s0) / (s1 - s0)
    past = samples >= budget
    return past and (
        curve.up_to_target is not None or samples >= args.max_budget * budget or not math.isfinite(loss)
    )


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Every configuration of ``--configs`` for one seed (its own centralized target)."""
    torch.set_num_threads(args.threads)
    job = load_job("charlm", job_args(args, args.batch, seed))
    big = load_job("charlm", job_args(args, args.batch * args.workers, seed))
    budget = args.steps * args.batch * args.workers
    model_bytes = len(dumps(weights_of(job.build_model()), {"run": "bench", "version": 0}))
    started = time.perf_counter()
    curves = [centralized(args, big, job, budget, seed)]
    curves[0].seconds = time.perf_counter() - started
    target = curves[0].loss_at_budget
    print(f"  seed {seed}: centralized {curves[0].seconds:.0f}s, target {target:.4f}", file=sys.stderr)
    for key in args.configs.split(","):
        t0 = time.perf_counter()
        if key == "sync":
            curve = sync_dp(args, job, target, budget, seed, model_bytes)
        else:
            curve = local_sgd(args, job, parse_plan(key, args.local_steps), target, budget, seed, model_bytes)
        curve.seconds = time.perf_counter() - t0
        curves.append(curve)
        print(
            f"  seed {seed}: {curve.name}: {curve.seconds:.0f}s, total to target {curve.total_to_target}, "
            f"loss at budget {curve.loss_at_budget:.4f} ({curve.loss_at_budget / target - 1:+.2%})",
            file=sys.stderr,
        )
    return {
        "seed": seed,
        "target": target,
        "model_bytes": model_bytes,
        "curves": [{**c.__dict__, "total_to_target": c.total_to_target} for c in curves],
    }


def run(args: argparse.Namespace) -> dict:
    if args.steps % args.eval_every:
        raise SystemExit("--steps must be a multiple of --eval-every")
    for key in args.configs.split(","):
        if key != "sync":
            plan = parse_plan(key, args.local_steps)
            if args.steps % plan.h:
                raise SystemExit(f"--steps must be a multiple of H ({key}: H={plan.h})")
    params = sum(
        v.numel() for v in load_job("charlm", job_args(args, 1, 0)).build_model().state_dict().values()
    )
    seeds = list(range(args.seed, args.seed + args.seeds))
    started = time.perf_counter()
    if args.processes > 1 and len(seeds) > 1:
        with ProcessPoolExecutor(min(args.processes, len(seeds)), mp_context=get_context("spawn")) as pool:
            per_seed = list(pool.map(run_seed, [args] * len(seeds), seeds))
    else:
        per_seed = [run_seed(args, s) for s in seeds]
    return {
        "params": params,
        "model_bytes": per_seed[0]["model_bytes"],
        "budget_samples": args.steps * args.batch * args.workers,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
        "seeds": per_seed,
    }


def _spread(values: list[float], fmt) -> str:
    """Mean, and the per-seed range when there are several seeds."""
    mean = fmt(statistics.mean(values))
    return mean if len(values) == 1 else f"{mean} ({fmt(min(values))} … {fmt(max(values))})"


def report(r: dict) -> str:
    a = r["args"]
    seeds = r["seeds"]
    n = len(seeds)
    keys = [c["key"] for c in seeds[0]["curves"][1:]]
    by_key = {k: [next(c for c in s["curves"] if c["key"] == k) for s in seeds] for k in keys}
    sync = by_key.get("sync")
    targets = [s["target"] for s in seeds]
    shape = MODELS[a["model"]]
    joined = a["workers"] * r["model_bytes"]  # every worker's fetch of version 0
    lines = [
        f"### Communication to target: charlm layers={shape['layers']} width={shape['width']} "
        f"context={shape['context']} ({r['params']:,} params, fp32 model {r['model_bytes']:,} B), "
        f"{a['workers']} workers x batch {a['batch']}, budget {r['budget_samples']:,} samples "
        f"({a['steps']} centralized steps of batch {a['batch'] * a['workers']}), inner AdamW lr "
        f"{a['lr']}, {n} seed{'s' if n > 1 else ''} ({', '.join(str(s['seed']) for s in seeds)})",
        "",
        "Target (per seed): centralized eval loss at the budget = "
        + ", ".join(f"{t:.4f}" for t in targets)
        + ".",
        "",
        f"Means over the seeds{' (range over seeds in brackets)' if n > 1 else ''}; bytes to "
        "target are means over the seeds that reached it.",
        "",
        "| configuration | B per upload | B per fetch | rounds to target | uplink to target | "
        "downlink to target | total to target | fewer total bytes than sync fp32 | "
        "same, version 0 built on each volunteer | eval loss at budget vs centralized |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        cs = by_key[key]
        reached = [c for c in cs if c["total_to_target"] is not None]
        missing = n - len(reached)
        note = f" (not reached in {missing}/{n})" if missing and reached else ""

        def mean_of(field: str, cs=reached) -> str:
            return _mb(statistics.mean(c[field] for c in cs)) if cs else "not reached"

        ratios, ratios0 = _ratios(sync, cs, 0), _ratios(sync, cs, joined)
        ratio = _spread(ratios, _x) if len(ratios) == n else "-"
        ratio0 = _spread(ratios0, _x) if len(ratios0) == n else "-"
        gaps = [c["loss_at_budget"] / t - 1 for c, t in zip(cs, targets, strict=True)]
        rounds = _spread([c["rounds_to_target"] for c in reached], lambda x: f"{x:.0f}") if reached else "-"
        lines.append(
            f"| {cs[0]['name']} | {cs[0]['upload_bytes']:,} | {cs[0]['update_bytes']:,} | {rounds}{note} | "
            f"{mean_of('up_to_target')} | {mean_of('down_to_target')} | {mean_of('total_to_target')} | "
            f"{ratio} | {ratio0} | {_spread(gaps, lambda x: f'{100 * x:+.1f}%')} |"
        )
    lines += [
        "",
        "Rounds to target: communication rounds (steps for sync). Downlink: every worker's fetch "
        f"of version 0 ({r['model_bytes']:,} B each) plus, per round, the new model (lossless "
        "downlink) or the encoded update (lossy downlink, `coordinator.merging.downlink.publish`); sync: "
        "the averaged fp32 gradient to every worker each step. Volunteers build version 0 from "
        "the job's seed and fetch nothing when its digest is the run's (`volunteer/worker.py`, "
        f"`initial_digest`): the next-to-last column leaves that fetch ({_mb(joined)}, the same "
        "for every row) out of both totals; the one before counts it.",
        "Samples to target (mean): "
        + ", ".join(f"{key} {_mean_or_dash([c['samples_to_target'] for c in by_key[key]])}" for key in keys)
        + f" (budget {r['budget_samples']:,}).",
    ]
    quorum = [k for k in keys if "quorum" in by_key[k][0]["name"]]
    for k in quorum:
        wasted = [c["wasted_to_target"] for c in by_key[k] if c["total_to_target"] is not None]
        if wasted:
            lines.append(
                f"{k}: the stragglers' wasted uploads are {_mb(statistics.mean(wasted))} of its uplink."
            )
        share = float(parse_plan(k, a["local_steps"]).quorum or a["workers"]) / a["workers"]
        at_trained = [
            _loss_at(c["points"], share * r["budget_samples"]) / t - 1 for c, t in zip(by_key[k], targets)
        ]
        lines.append(
            f"{k}: loss at equal *trained* samples (stragglers' included, {share:.0%} of the budget "
            f"merged): {_spread(at_trained, lambda x: f'{100 * x:+.1f}%')} vs centralized at the budget."
        )
    lines.append(
        "Wall time (all seeds, one process each): "
        + ", ".join(
            f"{key} {sum(next(c for c in s['curves'] if c['key'] == key)['seconds'] for s in seeds):.0f}s"
            for key in ["centralized", *keys]
        )
        + f"; run {r['seconds']:.0f}s."
    )
    best_key = "best" if "best" in by_key else keys[-1]
    if sync and best_key in by_key:
        best = by_key[best_key]
        ratios, ratios0 = _ratios(sync, best, 0), _ratios(sync, best, joined)
        gaps = [c["loss_at_budget"] / t - 1 for c, t in zip(best, targets, strict=True)]
        within = [
            k
            for k in keys
            if max(c["loss_at_budget"] / t - 1 for c, t in zip(by_key[k], targets, strict=True))
            <= GOAL_LOSS_GAP
        ]
        lines += [
            "",
            f"Goals ({best[0]['name']}):",
            _goal(ratios, n, "total bytes"),
            _goal(ratios0, n, "total bytes with version 0 built on each volunteer"),
            f"- eval loss at equal samples {100 * statistics.mean(gaps):+.1f}% vs centralized "
            f"(seeds {', '.join(f'{100 * g:+.1f}%' for g in gaps)}); goal within "
            f"{100 * GOAL_LOSS_GAP:.0f}%: {'MET' if max(gaps) <= GOAL_LOSS_GAP else 'NOT MET'}; "
            f"configurations within 3% in every seed: {', '.join(within) or 'none'}",
        ]
    return "\n".join(lines)


def _loss_at(points: list, samples: float) -> float:
    """Eval loss at ``samples`` (merged), interpolated between the evaluations around it."""
    for (_, _, s0, l0), (_, _, s1, l1) in zip(points, points[1:]):
        if s0 <= samples <= s1:
            return l1 if s1 == s0 else l0 + (l1 - l0) * (samples - s0) / (s1 - s0)
    return points[-1][3]


def _x(x: float) -> str:
    return f"{x:,.0f}x"


def _ratios(sync: list[dict] | None, cs: list[dict], joined: int) -> list[float]:
    """Per seed: sync's total bytes to target over the configuration's, less ``joined`` each."""
    return [
        (sc["total_to_target"] - joined) / (c["total_to_target"] - joined)
        for sc, c in zip(sync or [], cs, strict=False)
        if c["total_to_target"] and sc["total_to_target"]
    ]


def _goal(ratios: list[float], n: int, what: str) -> str:
    if len(ratios) < n:
        return f"- did not reach the target within the run in {n - len(ratios)}/{n} seeds: NOT MET"
    verdict = "MET" if min(ratios) >= GOAL_REDUCTION else "NOT MET"
    return (
        f"- {statistics.mean(ratios):,.0f}x fewer {what} than sync fp32 to the target (seeds "
        f"{', '.join(_x(x) for x in ratios)}); goal >= {GOAL_REDUCTION:,.0f}x: {verdict}"
    )


def _mean_or_dash(values: list) -> str:
    got = [v for v in values if v is not None]
    return f"{statistics.mean(got):,.0f}" if got else "-"


def _mb(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = r["seeds"][0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, c in enumerate(first["curves"]):
        totals = [p[0] + p[1] for p in c["points"]]
        ss = [p[2] for p in c["points"]]
        ys = [p[3] for p in c["points"]]
        color = f"C{i}"
        central = c["key"] == "centralized"
        right.plot(ss, ys, label=c["name"], color=color, marker=None if central else ".")
        if not central:
            left.plot(totals[1:], ys[1:], label=c["name"], color=color, marker=".")
    for ax in (left, right):
        ax.axhline(first["target"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_ylabel("eval loss (nats/byte)")
        ax.grid(True, alpha=0.3)
    left.set_xscale("log")
    left.set_xlabel("cumulative uplink + downlink bytes (all workers)")
    left.set_title(f"loss vs total bytes (seed {first['seed']})")
    right.axvline(r["budget_samples"], color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("training samples (merged)")
    right.set_title("loss vs samples (dotted: budget)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1m", help="charlm shape (default 1m)")
    p.add_argument("--steps", type=int, default=300, help="centralized steps (the budget)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="per-worker batch")
    p.add_argument("--local-steps", type=int, default=10, help="H of fedavg, diloco, diloco-int8")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=30, help="steps between evals (centralized, sync)")
    p.add_argument("--max-budget", type=float, default=2.0, help="run on to this x budget at most")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma list, 'sync' first (default {DEFAULT_CONFIGS}; see the module docstring)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=3, help="seeds (each its own centralized target)")
    p.add_argument("--processes", type=int, default=1, help="seeds run in this many processes")
    p.add_argument("--quick", action="store_true", help="a 120-step budget, 1 seed: a smoke run")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "comm_to_target.png")
    p.add_argument("--json", type=Path, default=None, help="also write the raw curves here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 120, 1
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, default=str))
    plot(result, args.plot)
    print(report(result))
    print(f"\nPlot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
