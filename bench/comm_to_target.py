"""Communication to a target loss on charlm: uplink bytes of sync fp32, FedAvg, DiLoCo, DiLoCo+top-k.

    python bench/comm_to_target.py [--steps 800] [--workers 4] [--local-steps 50] [--quick]

Simulated in one process with crowdtrain's own pieces, so it is fast and deterministic: the
job from ``jobs.load_job``, local training by ``volunteer.trainer.train_shard``
(fresh AdamW per shard, as volunteers do), uploads encoded by
``volunteer.feedback.ErrorFeedback`` (one per simulated volunteer, so top-k keeps its
residuals), decoded by ``serialization.loads`` and merged by ``coordinator.strategies``.
No Redis: the uplink of a round is the sum of ``len(blob)`` over its workers' uploads.

* centralized: one process, batch ``workers x batch`` (the global batch), ``--steps`` AdamW
  steps. Its eval loss at the end of that sample budget is the target.
* sync fp32 data-parallel: every step each worker encodes its fp32 gradient (batch ``batch``,
  its own shard), the server averages them and takes one AdamW step: mathematically
  centralized training, paying one gradient-sized upload per worker per step.
* fedavg / diloco with H local steps, and diloco with ``topk:0.01+int8`` + error feedback:
  ``steps / H`` rounds use the same samples as the centralized budget.

Every configuration may run on past the budget (up to ``--max-budget`` times it) until it
reaches the target; "loss at budget" is its eval loss at exactly the centralized sample count.
The plot (``--plot``, default ``docs/img/comm_to_target.png``) shows eval loss against
cumulative uplink bytes (log x) and against samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.strategies import make_strategy  # noqa: E402
from jobs import load_job  # noqa: E402
from serialization import dumps, loads, parse_codec  # noqa: E402
from volunteer.feedback import ErrorFeedback  # noqa: E402
from volunteer.trainer import GRAD_CLIP_NORM, seed_for, train_shard  # noqa: E402

GOAL_REDUCTION = 1000.0
GOAL_LOSS_GAP = 0.03
DEFAULT_CONFIGS = "sync,fedavg,diloco,diloco-int8,diloco-topk"
CPU = torch.device("cpu")


@dataclass
class Curve:
    """One configuration's eval-loss trajectory against uplink bytes and samples."""

    name: str
    key: str = ""
    points: list[tuple[int, int, float]] = field(default_factory=list)  # (bytes, samples, loss)
    upload_bytes: int = 0  # bytes of one worker's upload
    uploads_to_target: int | None = None
    bytes_to_target: int | None = None
    samples_to_target: int | None = None
    loss_at_budget: float | None = None
    seconds: float = 0.0


def job_args(args: argparse.Namespace, batch: int) -> dict:
    return {
        "layers": args.layers,
        "width": args.width,
        "heads": args.heads,
        "context": args.context,
        "batch_size": batch,
        "eval_batches": args.eval_batches,
    }


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def centralized(args, job, eval_job, budget: int) -> Curve:
    """Single-process AdamW on the global batch; evaluated every ``eval_every`` steps."""
    curve = Curve("centralized")
    model = job.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed)
    batches = iter(job.shard(0, 1))
    curve.points.append((0, 0, eval_job.evaluate(model)["eval_loss"]))
    for step in range(1, args.steps + 1):
        loss = job.loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.points.append((0, step * job.batch_size, eval_job.evaluate(model)["eval_loss"]))
    curve.loss_at_budget = curve.points[-1][2]
    assert curve.points[-1][1] == budget
    return curve


def sync_dp(args, job, target: float, budget: int) -> Curve:
    """Every step: each worker uploads its fp32 gradient; the server averages and steps AdamW."""
    curve = Curve("sync fp32 data-parallel (H=1)")
    model = job.build_model()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed)
    shards = [iter(job.shard(i, args.workers)) for i in range(args.workers)]
    sent = samples = 0
    curve.points.append((0, 0, job.evaluate(model)["eval_loss"]))
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
            sent += len(blob)
            curve.upload_bytes = len(blob)
            for k, g in loads(blob)[0].items():
                total[k].add_(g)
            samples += len(batch[0])
        for k, p in params.items():
            p.grad = total[k].div_(args.workers)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        opt.step()
        if step % args.eval_every == 0 or samples == budget:
            loss = job.evaluate(model)["eval_loss"]
            curve.points.append((sent, samples, loss))
            if _record(curve, loss, target, sent, samples, budget, step * args.workers, args):
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


def local_sgd(
    args,
    job,
    name: str,
    strategy: str,
    codec: str,
    target: float,
    budget: int,
    feedback_cls: type = ErrorFeedback,
) -> Curve:
    """Rounds of H local steps per worker (train_shard), encoded uploads, one strategy merge."""
    curve = Curve(name)
    chosen = parse_codec(codec)
    weights = weights_of(job.build_model())
    merge = make_strategy(strategy)
    feedback = [feedback_cls() for _ in range(args.workers)]
    model = job.build_model()
    sent = samples = 0
    curve.points.append((0, 0, job.evaluate(model)["eval_loss"]))
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
                steps=args.local_steps,
                lr=args.lr,
                optimizer="adamw",
                device=CPU,
                seed=seed_for(name, rnd, worker),
            )
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
            blob = feedback[worker].encode(result.delta, meta, chosen)
            sent += len(blob)
            curve.upload_bytes = len(blob)
            samples += result.samples
            delta, got = loads(blob)
            deltas.append((float(got["samples"]), delta))
        weights = merge.aggregate(weights, iter(deltas))
        model.load_state_dict(weights)
        loss = job.evaluate(model)["eval_loss"]
        curve.points.append((sent, samples, loss))
        if _record(curve, loss, target, sent, samples, budget, rnd * args.workers, args):
            return curve


def _record(
    curve: Curve, loss: float, target: float, sent: int, samples: int, budget: int, uploads: int, args
) -> bool:
    """Note the first crossing of the target and the loss at budget; True when done."""
    if curve.bytes_to_target is None and loss <= target:
        curve.bytes_to_target, curve.samples_to_target = sent, samples
        curve.uploads_to_target = uploads
    if samples == budget:
        curve.loss_at_budget = loss
    past = samples >= budget
    return past and (
        curve.bytes_to_target is not None or samples >= args.max_budget * budget or not math.isfinite(loss)
    )


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.steps % args.local_steps or args.steps % args.eval_every:
        raise SystemExit("--steps must be a multiple of --local-steps and --eval-every")
    job = load_job("charlm", job_args(args, args.batch))
    big = load_job("charlm", job_args(args, args.batch * args.workers))
    budget = args.steps * args.batch * args.workers
    params = sum(v.numel() for v in job.build_model().state_dict().values())
    model_bytes = len(dumps(weights_of(job.build_model()), {"run": "bench", "version": 0}))
    started = time.perf_counter()
    curves = [centralized(args, big, job, budget)]
    curves[0].seconds = time.perf_counter() - started
    target = curves[0].loss_at_budget
    h = args.local_steps
    plans = {
        "sync": lambda: sync_dp(args, job, target, budget),
        "fedavg": lambda: local_sgd(args, job, f"fedavg H={h}", "fedavg", "none", target, budget),
        "diloco": lambda: local_sgd(args, job, f"diloco H={h}", "diloco", "none", target, budget),
        "diloco-int8": lambda: local_sgd(args, job, f"diloco H={h} + int8", "diloco", "int8", target, budget),
        "diloco-topk": lambda: local_sgd(
            args,
            job,
            f"diloco H={h} + topk:0.01+int8 (error feedback)",
            "diloco",
            "topk:0.01+int8",
            target,
            budget,
        ),
        "fedavg-topk": lambda: local_sgd(
            args,
            job,
            f"fedavg H={h} + topk:0.01+int8 (error feedback)",
            "fedavg",
            "topk:0.01+int8",
            target,
            budget,
        ),
        "diloco-topk-decay": lambda: local_sgd(
            args,
            job,
            f"diloco H={h} + topk:0.01+int8 (feedback decay 0.9, what-if)",
            "diloco",
            "topk:0.01+int8",
            target,
            budget,
            DecayingFeedback,
        ),
    }
    for key in args.configs.split(","):
        if key not in plans:
            raise SystemExit(f"--configs: unknown {key!r}; known: {', '.join(plans)}")
        t0 = time.perf_counter()
        curve = plans[key]()
        curve.key = key
        curve.seconds = time.perf_counter() - t0
        curves.append(curve)
        print(f"  {curve.name}: {curve.seconds:.0f}s, to target {curve.bytes_to_target}", file=sys.stderr)
    return {
        "params": params,
        "model_bytes": model_bytes,
        "budget_samples": budget,
        "target": target,
        "args": vars(args),
        "curves": [c.__dict__ for c in curves],
    }


def report(r: dict) -> str:
    a = r["args"]
    curves = r["curves"]
    target = r["target"]
    sync = next(c for c in curves if c["key"] == "sync")
    lines = [
        f"### Communication to target: charlm layers={a['layers']} width={a['width']} "
        f"context={a['context']} ({r['params'] / 1e3:.0f}K params, fp32 "
        f"{4 * r['params'] / 1e3:.0f} kB), {a['workers']} workers x batch {a['batch']}, "
        f"budget {r['budget_samples']} samples ({a['steps']} centralized steps of batch "
        f"{a['batch'] * a['workers']}), inner AdamW lr {a['lr']}",
        "",
        f"Target: centralized eval loss at the budget = **{target:.4f}**.",
        "",
        "| configuration | bytes per upload | uploads to target | uplink bytes to target | "
        "fewer bytes than sync fp32 | downlink to target | eval loss at budget | "
        "vs centralized |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves[1:]:
        reached = c["bytes_to_target"] is not None
        fewer = (
            sync["bytes_to_target"] / c["bytes_to_target"] if reached and sync["bytes_to_target"] else None
        )
        gap = c["loss_at_budget"] / target - 1 if c["loss_at_budget"] is not None else None
        uploads = c["uploads_to_target"] if reached else "not reached"
        to_target = _mb(c["bytes_to_target"]) if reached else "> " + _mb(c["points"][-1][0])
        ratio = f"{fewer:,.0f}x" if fewer else "-"
        vs = f"{100 * gap:+.1f}%" if gap is not None else "-"
        down = _mb(c["uploads_to_target"] * r["model_bytes"]) if reached else "-"
        lines.append(
            f"| {c['name']} | {c['upload_bytes']:,} | {uploads} | {to_target} | "
            f"{ratio} | {down} | {c['loss_at_budget']:.4f} | {vs} |"
        )
    best = next((c for c in curves if c["key"] == "diloco-topk"), curves[-1])
    fewer = (
        sync["bytes_to_target"] / best["bytes_to_target"]
        if best["bytes_to_target"] and sync["bytes_to_target"]
        else None
    )
    gap = best["loss_at_budget"] / target - 1
    within = [c["name"] for c in curves[1:] if c["loss_at_budget"] / target - 1 <= GOAL_LOSS_GAP]
    lines += [
        "",
        "Uploads to target = workers x communication rounds. Downlink: every worker fetches "
        f"the new fp32 model ({r['model_bytes']:,} B) once per round (per step for sync "
        "data-parallel, which needs the averaged gradient or the new weights back). "
        "Samples to target: "
        + ", ".join(f"{c['name'].split(' (')[0]} {c['samples_to_target'] or '-'}" for c in curves[1:])
        + f" (budget {r['budget_samples']}).",
        "Wall time: " + ", ".join(f"{c['name'].split(' (')[0]} {c['seconds']:.0f}s" for c in curves) + ".",
        "",
        "Goals:",
        f"- {best['name']}: "
        + (
            f"{fewer:,.0f}x fewer uplink bytes than sync fp32 to the target"
            if fewer
            else "did not reach the target within the run"
        )
        + f" (goal >= {GOAL_REDUCTION:,.0f}x) "
        + ("MET" if fewer and fewer >= GOAL_REDUCTION else "NOT MET"),
        f"- its eval loss at equal samples: {100 * gap:+.1f}% vs centralized (goal within "
        f"{100 * GOAL_LOSS_GAP:.0f}%) {'MET' if gap <= GOAL_LOSS_GAP else 'NOT MET'}; "
        f"configurations within 3%: {', '.join(within) or 'none'}",
    ]
    return "\n".join(lines)


def _mb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, c in enumerate(r["curves"]):
        xs = [p[0] for p in c["points"]]
        ss = [p[1] for p in c["points"]]
        ys = [p[2] for p in c["points"]]
        color = f"C{i}"
        right.plot(ss, ys, label=c["name"], color=color, marker="." if c["name"] != "centralized" else None)
        if c["name"] != "centralized":
            left.plot(xs[1:], ys[1:], label=c["name"], color=color, marker=".")
    for ax in (left, right):
        ax.axhline(r["target"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_ylabel("eval loss (nats/byte)")
        ax.grid(True, alpha=0.3)
    left.set_xscale("log")
    left.set_xlabel("cumulative uplink bytes (all workers)")
    left.set_title("loss vs uplink bytes")
    right.axvline(r["budget_samples"], color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("training samples")
    right.set_title("loss vs samples (dotted: budget)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800, help="centralized steps (the budget)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="per-worker batch")
    p.add_argument("--local-steps", type=int, default=50, help="H of fedavg and diloco")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=25, help="steps between evals (centralized, sync)")
    p.add_argument("--max-budget", type=float, default=2.0, help="run on to this x budget at most")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma list, 'sync' first (default {DEFAULT_CONFIGS}; also fedavg-topk, diloco-topk-decay)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a 200-step budget, H=25: a smoke run")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "comm_to_target.png")
    p.add_argument("--json", type=Path, default=None, help="also write the raw curves here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.local_steps = 200, 25
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, default=str))
    plot(result, args.plot)
    print(report(result))
    print(f"\nPlot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
