"""``init``'s default codec against ``--compression none`` on a matrix of jobs, sync and async.

    python bench/defaults.py [--jobs charlm,gpt,linear,click,mlp] [--modes sync,async]
        [--codecs DEFAULT,none] [--seeds 3] [--rounds N] [--processes 2] [--json FILE]

Simulated in one process per task with crowdtrain's own pieces, as ``bench/comm_to_target.py``
does, and as ``init``'s defaults make a run: strategy fedavg, ``--local-steps`` 10
(``cli.coordinator.DEFAULT_LOCAL_STEPS``), inner AdamW lr 3e-3 with the inner state kept (the
default for fedavg), 2 volunteers, 4 shards a round, the downlink encoded with the run's codec
(``coordinator.merging.downlink.publish``: the next round trains from the *published* version).
Each volunteer keeps its own ``volunteer.feedback.ErrorFeedback`` and inner optimizer state;
uploads go through ``serialization.loads`` and are merged by ``coordinator.merging.strategies``, one
voice per volunteer as the aggregator merges them. No Redis.

* sync: every round the 4 shards are trained on the current version, shard s by volunteer
  s mod 2; the round's merge publishes the next version.
* async (``--mode async --buffer 2``): the volunteers take 1 and 2 ticks a shard; a shard is
  trained on the version current when its volunteer takes it; every 2 accepted deltas make a
  version, weighted by ``samples * staleness_weight`` (``coordinator.rounds.asynchronous``), deltas
  staler than the default ``max_staleness`` rejected. A "round" is a version.

The jobs: ``charlm`` (the built-in default shape, 136,960 parameters), ``gpt`` (the nano
preset, 1.07M parameters, batch 4 for time), and the jobs of ``tests/fixtures/jobs_small.py``:
``linear`` (17 parameters, label noise 0.1), ``click`` (131,073 parameters, zero-initialised,
sparse gradients) and ``mlp`` (10,504 parameters). Every task runs the same number of rounds
per job for every codec (equal rounds). ``DEFAULT`` in ``--codecs`` is
``cli.coordinator.DEFAULT_COMPRESSION``. Printed: one table, job x mode x codec: the eval loss
of the last version, mean over seeds (range in brackets), and its ratio to ``none``'s, mean of
the per-seed ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.async_momentum import _voices  # noqa: E402
from broker.run_config import DEFAULT_COMPRESSION, DEFAULT_MAX_STALENESS, default_of  # noqa: E402
from coordinator.merging.downlink import lossy, publish, read_residual  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from coordinator.rounds.asynchronous import staleness_weight  # noqa: E402
from jobs import load_job  # noqa: E402
from serialization import loads, parse_codec  # noqa: E402
from volunteer.feedback import ErrorFeedback  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

DEFAULT_LOCAL_STEPS = default_of("local_steps")

GOAL_RATIO = 1.05
VOLUNTEERS = 2
SHARDS = 4
BUFFER = 2
SPEEDS = (1, 2)  # async: ticks a shard takes on each volunteer
LR = 3e-3
FIXTURES = "tests.fixtures.jobs_small"
# name -> (job for load_job, job args, rounds)
JOBS: dict[str, tuple[str, dict, int]] = {
    "charlm": ("charlm", {}, 12),
    "gpt": ("gpt", {"batch_size": 4}, 8),
    "linear": (f"{FIXTURES}:linear", {"noise": 0.1}, 20),
    "click": (f"{FIXTURES}:click", {}, 20),
    "mlp": (f"{FIXTURES}:mlp", {}, 20),
}
CPU = torch.device("cpu")


class Sim:
    """One simulated run: the published weights, the volunteers' state, the downlink residual."""

    def __init__(self, job_name: str, codec: str, seed: int, local_steps: int) -> None:
        name, job_args, _ = JOBS[job_name]
        self.job = load_job(name, {**job_args, "seed": seed})
        self.codec = parse_codec(codec)
        self.model = self.job.build_model()
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.feedback = [ErrorFeedback() for _ in range(VOLUNTEERS)]
        self.states: list[dict | None] = [None] * VOLUNTEERS
        self.residual = None
        self.merge = make_strategy("fedavg")
        self.run = f"defaults-{job_name}-{seed}"
        self.local_steps = local_steps
        self.version = 0
        self.upload_bytes = 0

    def train(self, volunteer: int, shard: int, number: int) -> tuple[float, dict[str, torch.Tensor]]:
        """One shard trained on the current version; its upload as the aggregator decodes it."""
        result = train_shard(
            self.job,
            self.weights,
            shard=shard,
            shards=SHARDS,
            steps=self.local_steps,
            lr=LR,
            device=CPU,
            seed=seed_for(self.run, number, shard),
            optimizer_state=self.states[volunteer],
        )
        self.states[volunteer] = result.optimizer_state
        meta = {"run": self.run, "round": number, "shard": shard, "samples": result.samples}
        blob = self.feedback[volunteer].encode(result.delta, meta, self.codec)
        self.upload_bytes += len(blob)
        delta, got = loads(blob)
        return float(got["samples"]), delta

    def publish(self, buffer: list[tuple[int, float, dict[str, torch.Tensor]]]) -> float:
        """Merge one round (or buffer), publish the next version; its eval loss."""
        base = {k: v.clone() for k, v in self.weights.items()}
        merged = self.merge.aggregate({k: v.clone() for k, v in self.weights.items()}, iter(_voices(buffer)))
        self.version += 1
        if lossy(self.codec.name):
            meta = {"run": self.run, "version": self.version, "base_version": self.version - 1}
            self.weights, _, left = publish(base, merged, self.residual, self.codec.name, meta)
            self.residual = read_residual(left)
        else:
            self.weights = merged
        self.model.load_state_dict(self.weights)
        return float(self.job.evaluate(self.model)["eval_loss"])


def simulate(job_name: str, mode: str, codec: str, seed: int, rounds: int, local_steps: int) -> dict:
    """Eval loss per version of one run (version 0 first)."""
    started = time.perf_counter()
    sim = Sim(job_name, codec, seed, local_steps)
    losses = [float(sim.job.evaluate(sim.model)["eval_loss"])]
    if mode == "sync":
        for number in range(1, rounds + 1):
            buffer = [(s % VOLUNTEERS, *sim.train(s % VOLUNTEERS, s, number)) for s in range(SHARDS)]
            losses.append(sim.publish(buffer))
    else:
        limit = DEFAULT_MAX_STALENESS
        jobs = 0
        # volunteer -> (arrival tick, base version, samples, delta)
        out: dict[int, tuple[int, int, float, dict]] = {}

        def take(volunteer: int, now: int) -> None:
            nonlocal jobs
            samples, delta = sim.train(volunteer, jobs % SHARDS, jobs)
            out[volunteer] = (now + SPEEDS[volunteer], sim.version, samples, delta)
            jobs += 1

        for volunteer in range(VOLUNTEERS):
            take(volunteer, 0)
        buffer: list[tuple[int, float, dict]] = []
        while sim.version < rounds:
            volunteer = min(out, key=lambda v: (out[v][0], v))
            now, base, samples, delta = out.pop(volunteer)
            if sim.version - base <= limit:
                buffer.append((volunteer, samples * staleness_weight(sim.version - base), delta))
            if len(buffer) == BUFFER:
                losses.append(sim.publish(buffer))
                buffer = []
            if sim.version < rounds:
                take(volunteer, now)
    return {
        "job": job_name,
        "mode": mode,
        "codec": codec,
        "seed": seed,
        "losses": losses,
        "upload_bytes": sim.upload_bytes,
        "seconds": time.perf_counter() - started,
    }


def _task(task: tuple) -> dict:
    torch.set_num_threads(1)
    return simulate(*task)


def run(args: argparse.Namespace) -> list[dict]:
    tasks = [
        (job, mode, codec, seed, args.rounds or JOBS[job][2], args.local_steps)
        for job in args.jobs
        for mode in args.modes
        for codec in args.codecs
        for seed in range(args.seeds)
    ]
    tasks.sort(key=lambda t: t[0] != "gpt")  # the longest first, so the pool ends together
    if args.processes > 1:
        with ProcessPoolExecutor(args.processes, mp_context=get_context("spawn")) as pool:
            results = []
            for r in pool.map(_task, tasks):
                results.append(r)
                _progress(r)
            return results
    results = []
    for task in tasks:
        results.append(_task(task))
        _progress(results[-1])
    return results


def _progress(r: dict) -> None:
    print(
        f"  {r['job']} {r['mode']} {r['codec']} seed {r['seed']}: {r['losses'][0]:.4f} -> "
        f"{r['losses'][-1]:.4f} in {len(r['losses']) - 1} rounds, {r['seconds']:.0f}s",
        file=sys.stderr,
        flush=True,
    )


def report(results: list[dict], args: argparse.Namespace) -> str:
    final = {(r["job"], r["mode"], r["codec"], r["seed"]): r["losses"][-1] for r in results}
    start = {(r["job"], r["seed"]): r["losses"][0] for r in results}
    rounds = {r["job"]: len(r["losses"]) - 1 for r in results}
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"### init's defaults against none: fedavg, {args.local_steps} local steps, {VOLUNTEERS} "
        f"volunteers, {SHARDS} shards a round (async: buffer {BUFFER}, shard times {SPEEDS} ticks), "
        f"seeds {', '.join(map(str, seeds))}",
        "",
        "| job | rounds | mode | codec | eval loss at round 0 | final eval loss | ratio to none | "
        f"within {100 * (GOAL_RATIO - 1):.0f}% of none | worst relapse |",
        "|---|---:|---|---|---:|---:|---:|---|---:|",
    ]
    relapse = {(r["job"], r["mode"], r["codec"], r["seed"]): _relapse(r["losses"]) for r in results}
    worst: dict[str, float] = {}
    for job in args.jobs:
        for mode in args.modes:
            for codec in args.codecs:
                finals = [final[job, mode, codec, s] for s in seeds]
                initial = statistics.mean(start[job, s] for s in seeds)
                ratio = verdict = "-"
                if codec != "none" and "none" in args.codecs:
                    ratios = [final[job, mode, codec, s] / final[job, mode, "none", s] for s in seeds]
                    mean = statistics.mean(ratios)
                    worst[codec] = max(worst.get(codec, 0.0), mean)
                    ratio = _spread(ratios, lambda x: f"{x:.3f}")
                    verdict = "yes" if mean <= GOAL_RATIO else "**no**"
                worse = max(relapse[job, mode, codec, s] for s in seeds)
                lines.append(
                    f"| {job} | {rounds[job]} | {mode} | `{codec}` | {initial:.4f} | "
                    f"{_spread(finals, lambda x: f'{x:.4f}')} | {ratio} | {verdict} | {100 * worse:+.1f}% |"
                )
    lines += [
        "",
        "Worst relapse: the most any version's eval loss stood above the best version before it "
        "(worst seed): a codec that makes the model worse as it trains shows here.",
        "",
    ]
    for codec, ratio in worst.items():
        lines.append(f"Worst mean ratio to none, `{codec}`: {ratio:.3f} (goal <= {GOAL_RATIO}).")
    return "\n".join(lines)


def _relapse(losses: list[float]) -> float:
    """Largest rise of a version's eval loss over the best before it, relative to that best."""
    best, worst = losses[0], 0.0
    for loss in losses[1:]:
        worst = max(worst, loss / best - 1)
        best = min(best, loss)
    return worst


def _spread(values: list[float], fmt) -> str:
    mean = fmt(statistics.mean(values))
    return mean if len(values) == 1 else f"{mean} ({fmt(min(values))} … {fmt(max(values))})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma list of {', '.join(JOBS)}")
    p.add_argument("--modes", default="sync,async", help="comma list of sync, async")
    p.add_argument(
        "--codecs", default="DEFAULT,none", help="comma list of specs; DEFAULT is init's default codec"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="rounds for every job (default: per job)")
    p.add_argument("--local-steps", type=int, default=DEFAULT_LOCAL_STEPS)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write every run's losses here")
    p.add_argument("--from-json", type=Path, default=None, help="print the table of runs saved by --json")
    args = p.parse_args(argv)
    args.jobs = args.jobs.split(",")
    args.modes = args.modes.split(",")
    args.codecs = [
        DEFAULT_COMPRESSION if c == "DEFAULT" else parse_codec(c).name for c in args.codecs.split(",")
    ]
    unknown = [j for j in args.jobs if j not in JOBS] + [m for m in args.modes if m not in ("sync", "async")]
    if unknown:
        p.error(f"unknown job or mode {unknown[0]!r}")
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        args.jobs = [j for j in args.jobs if any(r["job"] == j for r in results)]
        args.modes = [m for m in args.modes if any(r["mode"] == m for r in results)]
        args.codecs = list(dict.fromkeys(r["codec"] for r in results))
        print(report(results, args))
        return 0
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
