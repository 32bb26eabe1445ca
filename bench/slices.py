"""Sliced runs (``init --slices S``): eval loss at equal samples, at equal compute, under one memory cap.

    python bench/slices.py [--rounds 40] [--shards 4] [--local-steps 10] [--seeds 1] [--first-seed 0]
        [--capped-only] [--json FILE] [--lr 3e-3] [--slice-lr-scale 1] [--slice-server-lr 1]
    python bench/slices.py --matrix 1x8,1x16,1x32,2x64 [--matrix-slices 2,4] [--max-layers 8] ...

Simulated in one process with crowdtrain's own pieces, as ``init``'s defaults make a run:
strategy fedavg, ``--local-steps`` 10, inner AdamW lr 3e-3 with the inner state kept (per
slice), ``--shards`` 4 a round, one volunteer per shard. The slices are the run's own
(``coordinator.runs.slicing.plan_run``: charlm cuts between layers); shard i trains slice
``i mod S`` (``volunteer.slicing.assignment``) on data shard ``(i + round) mod shards``
(``volunteer.slicing.data_shard``) with ``volunteer.trainer.train_shard(trainable=...)``, and
the round merges each slice from its own deltas (``SlicedStrategy.merge_slice``, as the
aggregator does). No Redis, no codec (a sliced run's downlink is ``none``; uploads are lossless
here too).

Compute is the volunteers' CPU seconds inside ``train_shard`` (``time.thread_time``, torch
on one thread), so a loaded machine slows it less than it slows wall time. A sliced shard
still runs the whole forward pass; its backward pass stops at the lowest trainable tensor
and only its slice gets gradients and an optimizer step.

Two comparisons:

* the same model (charlm, 2 layers, width 64) at S = 1, 2, 4;
* one memory cap for every volunteer: the cap is what a whole-model shard of that model needs
  (``shard_memory_gb``'s rule, unrounded: the model once and ``SLICE_FACTOR`` = 4.5 times its
  largest slice, at least twice the model; BENCHMARKS section 21 measured 5.2x and 2.2x the
  model's float32 bytes at S = 1 and 4), against a larger charlm (4 layers, width 72) whose
  shard fits under that cap only at S = 4 (checked and printed).

``--matrix``: one cap per small charlm ``LxW`` (L layers of width W, 4 heads), what its whole
shard needs by the same rule; against it, at each of ``--matrix-slices``, the charlm of the most
parameters (1 to ``--max-layers`` layers, width a multiple of 4) whose shard fits that cap at
that slice count (each fit asserted). ``--slice-lr-scale`` and ``--slice-server-lr`` change how a
sliced run trains (a sliced shard's inner lr, fedavg's server lr per slice); S = 1 runs ignore them.

Printed: eval loss after the last round (equal samples: every run trains the same shards of the
same batch size), the volunteers' CPU seconds, and each run's eval loss at equal compute: after
the last round whose cumulative CPU seconds are within the cheapest run's total of its table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from broker.run_config import RunConfig
from coordinator.merging.strategies import make_strategy
from coordinator.runs.slicing import SLICE_FACTOR, SlicedStrategy, plan_run
from jobs import load_job
from jobs.slicing import trainable
from volunteer.slicing import assignment, data_shard
from volunteer.trainer import seed_for, train_shard

COMMON = {"context": 64, "batch_size": 16, "max_files": 60, "eval_batches": 8}
SMALL = {"layers": 2, "width": 64, "heads": 4}
LARGE = {"layers": 4, "width": 72, "heads": 4}


def need_bytes(weights: dict[str, torch.Tensor], slices: list[list[str]]) -> int:
    """What one shard needs, by ``coordinator.runs.slicing.shard_memory_gb``'s rule, in bytes, unrounded."""
    sizes = trainable(weights)
    model = 4 * sum(sizes.values())
    largest = max(4 * sum(sizes[n] for n in names) for names in slices)
    return int(max(2 * model, model + SLICE_FACTOR * largest))


def shape_need(shape: dict[str, int], count: int) -> tuple[int, int]:
    """(params, bytes one shard needs) of charlm ``shape`` cut into the run's ``count`` slices."""
    job = load_job("charlm", {**COMMON, **shape, "seed": 0})
    weights = job.build_model().state_dict()
    return sum(trainable(weights).values()), need_bytes(weights, plan_run(job, weights, count))


def largest_fitting(cap: int, count: int, max_layers: int) -> dict[str, int] | None:
    """The charlm (1 to ``max_layers`` layers, width a multiple of 4, 4 heads) of the most
    parameters whose shard at ``count`` slices needs at most ``cap`` bytes; fewer layers on a tie."""
    best: tuple[int, dict[str, int]] | None = None
    for layers in range(1, max_layers + 1):
        for width in range(8, 1025, 4):
            shape = {"layers": layers, "width": width, "heads": 4}
            params, need = shape_need(shape, count)
            if need > cap:  # the need grows with the width: no wider one fits
                break
            if best is None or params > best[0]:
                best = (params, shape)
    return None if best is None else best[1]


def parse_shape(text: str) -> dict[str, int]:
    """``LxW`` (e.g. ``1x16``): charlm with L layers of width W, 4 heads."""
    layers, sep, width = text.partition("x")
    if (
        not sep
        or not layers.isdigit()
        or not width.isdigit()
        or int(layers) < 1
        or int(width) % 4
        or not int(width)
    ):
        raise ValueError(f"{text!r} is not LxW with W a multiple of 4 (e.g. 1x16)")
    return {"layers": int(layers), "width": int(width), "heads": 4}


def name(shape: dict[str, int]) -> str:
    return f"{shape['layers']}x{shape['width']}"


def simulate(args: argparse.Namespace, shape: dict[str, int], count: int, seed: int) -> dict[str, Any]:
    """One run: eval loss and cumulative volunteer CPU seconds after each round."""
    job = load_job("charlm", {**COMMON, **shape, "seed": seed})
    model = job.build_model()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    slices = plan_run(job, weights, count)
    config = RunConfig(slices=count, slice_tensors=slices if count > 1 else None)
    states: dict[int, dict | None] = {}
    cpu = 0.0
    curve: list[tuple[float, float]] = []
    lr = args.lr * (args.slice_lr_scale if count > 1 else 1.0)
    outer = {"server_lr": args.slice_server_lr} if count > 1 else {}
    for number in range(1, args.rounds + 1):
        deltas: dict[int, list[tuple[float, dict[str, torch.Tensor]]]] = {}
        for shard in range(args.shards):
            given = assignment(config, shard)
            index, names = given if given is not None else (0, None)
            began = time.thread_time()
            result = train_shard(
                job,
                weights,
                shard=data_shard(config, number, shard, args.shards),
                shards=args.shards,
                steps=args.local_steps,
                lr=lr,
                device=torch.device("cpu"),
                seed=seed_for(f"slices-{seed}", number, shard),
                optimizer_state=states.get(shard),
                trainable=names,
            )
            cpu += time.thread_time() - began
            states[shard] = result.optimizer_state  # shard i keeps its slice: the state is per slice
            deltas.setdefault(index, []).append((float(result.samples), result.delta))
        weights = {k: v.clone() for k, v in weights.items()}
        if count == 1:
            weights = make_strategy("fedavg").aggregate(weights, iter(deltas[0]))
        else:
            merger = SlicedStrategy(lambda: make_strategy("fedavg", **outer), {})
            for index, part in sorted(deltas.items()):
                merger.merge_slice(weights, slices[index], iter(part))
        model.load_state_dict(weights)
        curve.append((cpu, float(job.evaluate(model)["eval_loss"])))
    return {
        "params": sum(trainable(weights).values()),
        "need_bytes": need_bytes(weights, slices),
        "slices": [sum(trainable(weights)[n] for n in names) for names in slices],
        "curve": curve,
    }


def at_compute(curve: list[tuple[float, float]], budget: float) -> tuple[int, float]:
    """(rounds, eval loss) after the last round whose cumulative CPU seconds are within ``budget``."""
    done = [(i + 1, loss) for i, (cpu, loss) in enumerate(curve) if cpu <= budget * 1.0001]
    return done[-1] if done else (0, float("nan"))


def table(title: str, runs: list[tuple[str, int]], results: dict[tuple[str, int], list[dict]]) -> dict:
    """The rows of one table: each (shape, S) run's figures, mean over seeds."""
    budget = min(statistics.mean(r["curve"][-1][0] for r in results[run]) for run in runs)
    rows = []
    for shape, count in runs:
        rs = results[(shape, count)]
        equal = [at_compute(r["curve"], budget) for r in rs]
        rows.append(
            {
                "run": f"{shape} S={count}",
                "slices": count,
                "params": rs[0]["params"],
                "slice_params": rs[0]["slices"],
                "need_kib": rs[0]["need_bytes"] / 1024,
                "loss": statistics.mean(r["curve"][-1][1] for r in rs),
                "loss_per_seed": [r["curve"][-1][1] for r in rs],
                "cpu_s": statistics.mean(r["curve"][-1][0] for r in rs),
                "equal_compute_rounds": statistics.mean(e[0] for e in equal),
                "equal_compute_loss": statistics.mean(e[1] for e in equal),
                "curves": [r["curve"] for r in rs],
            }
        )
    return {"title": title, "budget_cpu_s": budget, "rows": rows}


def warm_up() -> None:
    """One shard of a tiny model first, so torch's first-call costs fall on no measured run."""
    job = load_job("charlm", {**COMMON, "layers": 1, "width": 8, "heads": 1})
    weights = job.build_model().state_dict()
    train_shard(job, weights, shard=0, shards=1, steps=2, lr=3e-3, device=torch.device("cpu"), seed=0)


def matrix(args: argparse.Namespace, smalls: list[dict[str, int]], counts: list[int], started: float) -> int:
    """Per cap (a whole small model's shard need): the small model whole, the largest that fits sliced."""
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    tables = []
    for small in smalls:
        params, cap = shape_need(small, 1)
        runs: list[tuple[dict[str, int], int]] = [(small, 1)]
        for count in counts:
            large = largest_fitting(cap, count, args.max_layers)
            if large is not None:
                runs.append((large, count))
        rows = []
        for shape, count in runs:
            assert shape_need(shape, count)[1] <= cap, f"{name(shape)} S={count} does not fit the cap"
            rs = [simulate(args, shape, count, seed) for seed in seeds]
            rows.append({"shape": name(shape), "slices": count, "runs": rs})
        budget = min(statistics.mean(r["curve"][-1][0] for r in row["runs"]) for row in rows)
        for row in rows:
            rs = row.pop("runs")
            half = args.rounds // 2
            row.update(
                params=rs[0]["params"],
                need_kib=rs[0]["need_bytes"] / 1024,
                loss=[r["curve"][-1][1] for r in rs],
                loss_half=[r["curve"][half - 1][1] for r in rs] if half else [],
                cpu_s=statistics.mean(r["curve"][-1][0] for r in rs),
                equal_compute=[at_compute(r["curve"], budget) for r in rs],
                curves=[r["curve"] for r in rs],
            )
        tables.append(
            {"small": name(small), "params": params, "cap_kib": cap / 1024, "budget": budget, "rows": rows}
        )
        print_cap(args, tables[-1])
    if args.json:
        Path(args.json).write_text(
            json.dumps({**vars(args), "tables": tables, "seconds": round(time.time() - started, 1)}, indent=2)
        )
    print(f"{round(time.time() - started, 1)} s")
    return 0


def print_cap(args: argparse.Namespace, t: dict[str, Any]) -> None:
    """One cap's rows as a markdown table (per-seed figures joined by ' / ')."""

    def each(values: list[float]) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    print(
        f"cap {t['cap_kib']:.0f} KiB (charlm {t['small']} whole, {t['params']:,} params); lr {args.lr:g}, "
        f"sliced lr x{args.slice_lr_scale:g}, slice server lr {args.slice_server_lr:g}, "
        f"{args.rounds} rounds; "
        f"equal compute = {t['budget']:.1f} CPU s"
    )
    print(
        "| run | params | shard need KiB | eval loss, half the rounds | eval loss, equal samples "
        "| volunteer CPU s | CPU vs whole | rounds at equal compute | eval loss, equal compute |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = t["rows"][0]["cpu_s"]
    for r in t["rows"]:
        print(
            f"| {r['shape']} S={r['slices']} | {r['params']:,} ({r['params'] / t['params']:.2f}x) "
            f"| {r['need_kib']:.0f} | {each(r['loss_half'])} | {each(r['loss'])} | {r['cpu_s']:.1f} "
            f"| {r['cpu_s'] / base:.2f}x | {' / '.join(str(e[0]) for e in r['equal_compute'])} "
            f"| {each([e[1] for e in r['equal_compute']])} |"
        )
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--capped-only", action="store_true", help="only small S=1 and large S=4")
    p.add_argument("--json", metavar="FILE", help="also write the figures and loss curves to FILE")
    p.add_argument(
        "--matrix",
        metavar="SHAPES",
        help="instead: one memory cap per small charlm LxW in SHAPES (e.g. 1x8,1x16,1x32,2x64), "
        "each whole against the largest charlm that fits its cap at each --matrix-slices",
    )
    p.add_argument("--matrix-slices", default="2,4", help="slice counts of the matrix's larger models")
    p.add_argument("--max-layers", type=int, default=8, help="the deepest larger model the matrix considers")
    p.add_argument("--lr", type=float, default=3e-3, help="the inner AdamW learning rate (init's default)")
    p.add_argument(
        "--slice-lr-scale", type=float, default=1.0, help="a sliced shard's inner lr: --lr times this"
    )
    p.add_argument(
        "--slice-server-lr", type=float, default=1.0, help="fedavg's server lr for each slice's merge"
    )
    args = p.parse_args(argv)
    if args.shards < 4:
        p.error("--shards must be >= 4: a round trains every one of S = 4 slices")
    if args.rounds < 1 or args.seeds < 1 or args.max_layers < 1:
        p.error("--rounds, --seeds and --max-layers must be >= 1")
    if not (args.lr > 0 and args.slice_lr_scale > 0 and args.slice_server_lr > 0):
        p.error("--lr, --slice-lr-scale and --slice-server-lr must be > 0")
    smalls: list[dict[str, int]] = []
    counts: list[int] = []
    if args.matrix:
        try:
            smalls = [parse_shape(t) for t in args.matrix.split(",")]
            counts = [int(t) for t in args.matrix_slices.split(",")]
        except ValueError as e:
            p.error(f"--matrix / --matrix-slices: {e}")
        if any(c < 2 or c > args.shards for c in counts):
            p.error("--matrix-slices: each count between 2 and --shards")
    torch.set_num_threads(1)
    started = time.time()
    warm_up()
    if args.matrix:
        return matrix(args, smalls, counts, started)
    shapes = {"small": SMALL, "large": LARGE}
    runs = [("small", 1), ("small", 2), ("small", 4), ("large", 4), ("large", 2), ("large", 1)]
    if args.capped_only:  # the comparison that matters alone: the whole small model, the sliced large one
        runs = [("small", 1), ("large", 4)]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = {
        (shape, count): [simulate(args, shapes[shape], count, seed) for seed in seeds]
        for shape, count in runs
    }
    same = table(
        "the same model (charlm 2 layers, width 64) at S = 1, 2, 4",
        [r for r in runs if r[0] == "small"],
        results,
    )
    capped = table(
        "one memory cap, a whole small-model shard's need: the small model whole against "
        "the larger one (4 layers, width 72) sliced",
        [runs[0], *(r for r in runs if r[0] == "large")],
        results,
    )
    cap = capped["rows"][0]["need_kib"]
    for row in capped["rows"]:
        row["fits_cap"] = row["need_kib"] <= cap
    document = {
        **vars(args),
        "tables": [same, capped],
        "cap_kib": cap,
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    print(
        f"charlm, fedavg, {args.shards} shards a round of {args.local_steps} local AdamW steps "
        f"(batch {COMMON['batch_size']}, context {COMMON['context']}), {args.rounds} rounds, "
        f"{args.seeds} seed(s); {document['seconds']} s\n"
    )
    for t in (same, capped):
        print(f"{t['title']}; equal compute = {t['budget_cpu_s']:.1f} volunteer CPU s\n")
        print(
            "| run | params | largest slice | shard need KiB | fits the cap | eval loss, equal samples "
            "| volunteer CPU s | CPU vs first row | rounds at equal compute | eval loss, equal compute |"
        )
        print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        base = t["rows"][0]["cpu_s"]
        for r in t["rows"]:
            fits = "yes" if r["need_kib"] <= cap else "no"
            print(
                f"| {r['run']} | {r['params']:,} | {max(r['slice_params']):,} | {r['need_kib']:.0f} | {fits} "
                f"| {r['loss']:.4f} | {r['cpu_s']:.1f} | {r['cpu_s'] / base:.2f}x "
                f"| {r['equal_compute_rounds']:.0f} | {r['equal_compute_loss']:.4f} |"
            )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
