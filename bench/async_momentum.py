"""Delayed Nesterov in asynchronous runs: eval loss at equal merged deltas, per momentum delay.

    python bench/async_momentum.py [--versions 60] [--seeds 3] [--local-steps 10] [--configs ...] [--json]

Simulated in one process with crowdtrain's own pieces, deterministically: charlm (1 layer,
width 32: ``bench.inner_state.JOB_ARGS``), eight volunteers of the speeds of
``bench/heterogeneous.py`` (a job takes 1, 1, 2, 2, 4, 4, 8 and 8 ticks), an asynchronous run
as ``init --mode async --shards 8 --buffer 4`` makes it (``coordinator/rounds/asynchronous.py``):

* 8 jobs are outstanding, one per volunteer; a job is posted on the version current when its
  volunteer takes it and trained there by ``volunteer.trainer.train_shard`` (AdamW, lr 3e-3,
  ``--local-steps``, inner state reset, shard = job number mod 8 as ``volunteer/worker.py``
  cycles them, batch seed ``seed_for``); its delta arrives ``speed`` ticks later (ties in
  volunteer order) and the volunteer takes the next job at once, on the then-current version.
* A delta arriving while version c is current, trained on version v, is ``c - v`` stale:
  over ``--max-staleness`` (the project's default, 8) it is rejected; else it goes into the
  buffer with weight ``samples * staleness_weight(c - v)`` (``coordinator.rounds.asynchronous``).
* Every 4 accepted deltas the buffer is merged as the aggregator's ``_merge`` does: one voice
  per volunteer (its deltas of the buffer combined by weight, weighing their sum), passed as
  ``make_strategy(spec, momentum_delay=N).aggregate(weights, iter([(weight, delta), ...]))``
  with one strategy object kept across the run (the aggregator saves and reloads its state).

Every configuration runs for ``--versions`` merges (``4 x versions`` merged deltas) on the same
job schedule and the same batches (seeds pair the configurations), and every version is
evaluated on charlm's fixed held-out windows. A configuration is ``STRATEGY[/delay=N][/slr=X]
[/mom=X]``; the project's own delay for these runs is ``mode_of(config).momentum_delay`` =
ceil(8 / 4) = 2. Reported: final eval loss, mean ± sample standard deviation over seeds, the
paired difference against the same strategy with its defaults and delay 1 (two-sided paired
t-test over seeds), the mean eval loss of the last 10 versions (a steadier figure than the
last version alone when a run oscillates) with its paired difference, and the mean curve every
few versions.

The default configurations add a control, ``diloco/delay=1/slr=0.385``: with a steady mean
delta g, delay N moves the weights by ``(N + mu / (1 - mu)) lr g`` per N buffers against
plain Nesterov's ``lr g / (1 - mu)`` per buffer, so delay 2 (mu 0.9) is, in the steady state,
plain Nesterov with lr x 11/20 (0.385 for DiLoCo's 0.7). It tells an effect of the delay from
one of a smaller outer step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.heterogeneous import SLOWDOWNS
from bench.inner_state import JOB_ARGS
from broker.run_config import DEFAULT_MAX_STALENESS, RunConfig
from coordinator.merging.strategies import make_strategy
from coordinator.rounds.asynchronous import staleness_weight
from coordinator.rounds.modes import mode_of
from jobs import load_job
from volunteer.trainer import seed_for, train_shard

SHARDS = 8
BUFFER = 4
RUN_CONFIG = RunConfig(mode="async", shards=SHARDS, buffer=BUFFER)
PROJECT_DELAY = mode_of(RUN_CONFIG).momentum_delay  # ceil(8 / 4) = 2
DEFAULT_CONFIGS = ",".join(
    [
        "fedavg",
        "diloco/delay=1",
        "diloco/delay=2",
        "diloco/delay=4",
        "diloco/delay=1/slr=0.385",
        "fedavgm/delay=1",
        "fedavgm/delay=2",
    ]
)
TAIL = 10  # versions averaged in the "last versions" column
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Config:
    key: str
    strategy: str
    delay: int = 1
    server_lr: float | None = None
    momentum: float | None = None

    @property
    def baseline(self) -> str | None:
        """The key of the same strategy with its defaults and plain Nesterov (delay 1)."""
        plain = f"{self.strategy}/delay=1"
        return plain if self.strategy in ("diloco", "fedavgm") and self.key != plain else None


def parse_config(spec: str) -> Config:
    strategy, *pairs = spec.strip().split("/")
    values: dict = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or k not in ("delay", "slr", "mom"):
            raise SystemExit(f"--configs: {spec!r}: expected delay=N, slr=X or mom=X, got {pair!r}")
        values[{"delay": "delay", "slr": "server_lr", "mom": "momentum"}[k]] = (
            int(v) if k == "delay" else float(v)
        )
    config = Config(key=spec.strip(), strategy=strategy, **values)
    make_strategy(  # validate early
        strategy, server_lr=config.server_lr, momentum=config.momentum, momentum_delay=config.delay
    )
    return config


@dataclass
class Run:
    """One configuration and seed: eval loss per version and what the schedule did."""

    losses: list[float] = field(default_factory=list)  # versions 0..V
    staleness: list[int] = field(default_factory=list)  # of every merged delta
    rejected: int = 0
    trained: int = 0
    seconds: float = 0.0


def simulate(args: argparse.Namespace, config: Config, seed: int) -> Run:
    started = time.perf_counter()
    run = Run()
    job = load_job("charlm", {**JOB_ARGS, "seed": seed})
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run.losses.append(float(job.evaluate(model)["eval_loss"]))
    strategy = make_strategy(
        config.strategy, server_lr=config.server_lr, momentum=config.momentum, momentum_delay=config.delay
    )
    limit = DEFAULT_MAX_STALENESS
    version = jobs = 0
    # out[volunteer] = (arrival tick, base version, samples, delta)
    out: dict[int, tuple[int, int, float, dict[str, torch.Tensor]]] = {}
    buffer: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # (volunteer, weight, delta)

    def post(volunteer: int, now: int) -> None:
        nonlocal jobs
        result = train_shard(
            job,
            weights,
            shard=jobs % SHARDS,
            shards=SHARDS,
            steps=args.local_steps,
            lr=args.lr,
            device=CPU,
            seed=seed_for(f"async-momentum-{seed}", version, jobs),
        )
        out[volunteer] = (now + args.slowdowns[volunteer], version, float(result.samples), result.delta)
        jobs += 1
        run.trained += 1

    for volunteer in range(len(args.slowdowns)):
        post(volunteer, 0)
    while version < args.versions:
        volunteer = min(out, key=lambda v: (out[v][0], v))
        now, base, samples, delta = out.pop(volunteer)
        stale = version - base
        if stale > limit:
            run.rejected += 1
        else:
            buffer.append((volunteer, samples * staleness_weight(stale), delta))
            run.staleness.append(stale)
        if len(buffer) == BUFFER:
            weights = strategy.aggregate(weights, iter(_voices(buffer)))
            buffer.clear()
            version += 1
            model.load_state_dict(weights)
            run.losses.append(float(job.evaluate(model)["eval_loss"]))
        if version < args.versions:
            post(volunteer, now)
    run.seconds = time.perf_counter() - started
    return run


def _voices(buffer: list[tuple[int, float, dict[str, torch.Tensor]]]) -> list[tuple[float, dict]]:
    """One ``(weight, delta)`` per volunteer, as ``Aggregator._voice``: its deltas combined by weight."""
    grouped: dict[int, list[tuple[float, dict[str, torch.Tensor]]]] = defaultdict(list)
    for volunteer, weight, delta in buffer:
        grouped[volunteer].append((weight, delta))
    voices = []
    for items in grouped.values():
        total = sum(w for w, _ in items)
        combined = {k: sum(d[k] * (w / total) for w, d in items) for k in items[0][1]}
        voices.append((total, combined if len(items) > 1 else items[0][1]))
    return voices


def paired_p(diffs: list[float]) -> float | None:
    """Two-sided p of a paired t-test that the mean difference is 0 (None under 2 pairs)."""
    n = len(diffs)
    if n < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if statistics.mean(diffs) else 1.0
    t = statistics.mean(diffs) / (sd / math.sqrt(n))
    try:
        from scipy.stats import t as student

        return float(2 * student.sf(abs(t), n - 1))
    except ImportError:  # df = 2 has a closed form; others: none
        return 1 - abs(t) / math.sqrt(2 + t * t) if n == 3 else None


def _tail(run: Run) -> float:
    """Mean eval loss of the run's last ``TAIL`` versions: steadier than the last one alone."""
    return statistics.mean(run.losses[-TAIL:])


def _p(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def summarize(args: argparse.Namespace, configs: list[Config], runs: dict[str, list[Run]]) -> dict:
    rows = []
    for config in configs:
        rs = runs[config.key]
        finals = [r.losses[-1] for r in rs]
        row = {
            "config": config.key,
            "strategy": config.strategy,
            "delay": config.delay,
            "final_mean": statistics.mean(finals),
            "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_per_seed": finals,
            "tail_mean": statistics.mean(_tail(r) for r in rs),
            "tail_sd": statistics.stdev([_tail(r) for r in rs]) if len(rs) > 1 else 0.0,
            "curve_mean": [statistics.mean(v) for v in zip(*(r.losses for r in rs))],
            "curves": [r.losses for r in rs],
            "mean_staleness": statistics.mean(s for r in rs for s in r.staleness),
            "max_staleness": max(s for r in rs for s in r.staleness),
            "rejected": sum(r.rejected for r in rs),
            "trained": sum(r.trained for r in rs),
            "seconds": sum(r.seconds for r in rs),
        }
        if config.baseline in runs:
            diffs = [a - b for a, b in zip(finals, (r.losses[-1] for r in runs[config.baseline]))]
            row.update(vs=config.baseline, diff_per_seed=diffs, diff_mean=statistics.mean(diffs))
            row["p"] = paired_p(diffs)
            tails = [_tail(a) - _tail(b) for a, b in zip(rs, runs[config.baseline])]
            row.update(tail_diff_mean=statistics.mean(tails), tail_p=paired_p(tails))
        rows.append(row)
    return {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "project_delay": PROJECT_DELAY,
        "rows": rows,
    }


def report(doc: dict) -> str:
    a = doc["args"]
    rows = doc["rows"]
    lines = [
        f"charlm (1 layer, width 32), async: {SHARDS} jobs out, buffer {BUFFER}, max staleness "
        f"{DEFAULT_MAX_STALENESS}, volunteer slow-downs {','.join(map(str, a['slowdowns']))} ticks per job, "
        f"{a['local_steps']} local AdamW steps per job; {a['versions']} versions = "
        f"{BUFFER * a['versions']} merged deltas; {a['seeds']} seeds; project delay "
        f"ceil({SHARDS}/{BUFFER}) = {doc['project_delay']}",
        "",
        "| configuration | momentum delay | final eval loss (mean ± sd) | per seed | "
        "vs delay 1 (paired, per seed) | p (paired t) | last 10 versions (mean ± sd) | "
        "last 10 vs delay 1 (p) |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        per_seed = ", ".join(f"{x:.4f}" for x in r["final_per_seed"])
        if "vs" in r:
            diffs = ", ".join(f"{d:+.4f}" for d in r["diff_per_seed"])
            vs = f"{r['diff_mean']:+.4f} ({diffs})"
            p = _p(r["p"])
            tail_vs = f"{r['tail_diff_mean']:+.4f} ({_p(r['tail_p'])})"
        else:
            vs = p = tail_vs = "-"
        delay = r["delay"] if r["strategy"] in ("diloco", "fedavgm") else "-"
        final = f"{r['final_mean']:.4f} ± {r['final_sd']:.4f}"
        tail = f"{r['tail_mean']:.4f} ± {r['tail_sd']:.4f}"
        lines.append(f"| {r['config']} | {delay} | {final} | {per_seed} | {vs} | {p} | {tail} | {tail_vs} |")
    every = max(1, a["versions"] // 6)
    marks = sorted({*range(0, a["versions"] + 1, every), a["versions"]})
    lines += [
        "",
        "Eval loss per version (mean over seeds):",
        "",
        "| configuration | " + " | ".join(f"v{m}" for m in marks) + " |",
        "| --- | " + " | ".join("---:" for _ in marks) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | " + " | ".join(f"{r['curve_mean'][m]:.3f}" for m in marks) + " |")
    first = rows[0]
    lines += [
        "",
        f"Schedule (the same for every configuration): merged deltas' staleness mean "
        f"{first['mean_staleness']:.2f}, max {first['max_staleness']}; rejected as too stale "
        f"{first['rejected']} of {first['trained']} trained jobs (all seeds; the rest still out at the "
        "end). Wall time: " + ", ".join(f"{r['config']} {r['seconds']:.0f}s" for r in rows) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=60, help="merges per run (x4 merged deltas)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW lr")
    p.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="comma list of STRATEGY[/delay=N][/slr=X][/mom=X]"
    )
    p.add_argument("--json", action="store_true", help="print the raw results as JSON instead")
    args = p.parse_args(argv)
    args.slowdowns = list(SLOWDOWNS)
    torch.set_num_threads(1)
    configs = [parse_config(c) for c in args.configs.split(",")]
    runs: dict[str, list[Run]] = {}
    for config in configs:
        runs[config.key] = []
        for seed in range(args.seeds):
            runs[config.key].append(simulate(args, config, seed))
            print(
                f"  {config.key} seed {seed}: {runs[config.key][-1].losses[-1]:.4f} "
                f"({runs[config.key][-1].seconds:.0f}s)",
                file=sys.stderr,
            )
    doc = summarize(args, configs, runs)
    print(json.dumps(doc, indent=2) if args.json else report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
