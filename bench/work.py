"""Proof of work done (``init --work-check``): lazy, wrong-data and copying volunteers against the replay.

    python bench/work.py [--rounds 10] [--seeds 3] [--honest 4] [--rate 0.1] [--compression SPEC] [--json]

Simulated in one process with crowdtrain's own pieces: charlm (1 layer, width 32) from
``jobs.load_job``; each volunteer trains its own shard of the round with
``volunteer.trainer.train_shard`` (10 local AdamW steps, lr 3e-3, a fresh inner optimizer:
``--inner-state reset``, which ``--work-check`` needs) and uploads through its own
``ErrorFeedback`` in the run's codec (default ``init``'s, ``topk:0.01+int2@4096``); the
trusted side draws shards with ``coordinator.merging.work.draw`` (probation included), replays
them (and every upload ``coordinator.merging.work.short`` marks) with
``coordinator.merging.work.replay`` and compares with ``coordinator.merging.work.mismatch``,
exactly as the aggregator does; a failed check forfeits the volunteer's record. FedAvg
merges the shards that pass. Scenarios: honest volunteers plus one of

* ``lazy H/2``, ``lazy H/4``, ``lazy 1``: trains 5, 2 or 1 step and claims 10;
* ``turns lazy H/2``: honest until round 6, then half the steps claiming 10 (a veteran turning
  lazy: its uploads carry its honest past's error-feedback residual);
* ``lazy H/2 rescaled``: trains 5 steps, claims 10, and scales its delta to the norm its shard's
  full training has (which no real attacker knows): the blind spot of the short mark;
* ``other data``: trains 10 steps on another shard's batches;
* ``copier (peer)``: uploads another volunteer's delta of the round;
* ``copier (last)``: uploads the last published update (round 1: a peer's delta).

Each attacker is a new identity (probation) or a veteran (a record of 100 merged shards:
checked at the steady rate). Figures: detection recall within the rounds (runs in which
the attacker was rejected ``work`` at least once), cheating shards checked and caught,
honest shards rejected, and the trusted side's replay seconds as a fraction of the
volunteers' training seconds: over the run (new identities on probation) and in steady
state (every identity a veteran, honest run); the shards marked short, and each upload's
norm over the round's others' median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging import work  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from coordinator.rounds.validation import delta_norm  # noqa: E402
from jobs import load_job  # noqa: E402
from serialization import loads  # noqa: E402
from volunteer.feedback import ErrorFeedback  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

JOB_ARGS = {"layers": 1, "width": 32, "heads": 2, "context": 32, "max_files": 60, "eval_batches": 4}
STEPS, LR = 10, 3e-3
ATTACKS = (
    "lazy H/2",
    "lazy H/4",
    "lazy 1",
    "turns lazy H/2",
    "lazy H/2 rescaled",
    "other data",
    "copier (peer)",
    "copier (last)",
)
TURNS = 6  # the round from which ``turns lazy H/2`` cheats
VETERAN = 100
Delta = dict[str, torch.Tensor]


def train(job, weights, shard: int, shards: int, steps: int, seed: int) -> tuple[Delta, int, float]:
    started = time.process_time()
    result = train_shard(
        job, weights, shard=shard, shards=shards, steps=steps, lr=LR, device=torch.device("cpu"), seed=seed
    )
    return result.delta, result.samples, time.process_time() - started


def simulate(args, attack: str | None, seed: int, veteran: bool) -> dict:
    job = load_job("charlm", {**JOB_ARGS, "seed": seed})
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    merger = make_strategy("fedavg")
    names = [f"honest-{i}" for i in range(args.honest)] + ([attack] if attack else [])
    shards = len(names)
    records = dict.fromkeys(names, VETERAN if veteran else 0)
    feedback = {n: ErrorFeedback() for n in names}
    run = f"work-{seed}"
    last: Delta | None = None
    checked = honest_rejected = honest_shards = cheats = cheats_checked = cheats_caught = 0
    caught_round: int | None = None
    attacker: list[tuple[float, float]] = []  # (cosine, norm ratio) of each checked shard
    honest_seen: list[tuple[float, float]] = []
    marks = [0, 0]  # honest shards marked short, cheating shards marked short
    attacker_sizes: list[float] = []  # each upload's norm / the round's other uploads' median
    honest_sizes: list[float] = []
    train_s = check_s = 0.0
    for number in range(1, args.rounds + 1):
        uploads: dict[str, Delta] = {}
        claims: dict[str, int] = {}
        raw: dict[str, Delta] = {}
        for i, name in enumerate(names):
            seed_i = seed_for(run, number, i)
            if name == attack and attack == "turns lazy H/2" and number < TURNS:  # honest until then
                delta, samples, seconds = train(job, weights, i, shards, STEPS, seed_i)
            elif name == attack and attack == "turns lazy H/2":  # its honest past's residual uploaded too
                delta, samples, seconds = train(job, weights, i, shards, STEPS // 2, seed_i)
                samples = samples * 2
            elif name == attack and attack == "lazy H/2 rescaled":  # the short mark's blind spot
                delta, samples, seconds = train(job, weights, i, shards, STEPS // 2, seed_i)
                samples = samples * 2
                full, _, _ = train(job, weights, i, shards, STEPS, seed_i)  # the length it should have:
                scale = delta_norm(full) / max(delta_norm(delta), 1e-30)  # known to no real attacker
                delta = {k: v * scale if v.is_floating_point() else v for k, v in delta.items()}
            elif name == attack and attack.startswith("lazy"):
                steps = {"lazy H/2": STEPS // 2, "lazy H/4": STEPS // 4, "lazy 1": 1}[attack]
                delta, samples, seconds = train(job, weights, i, shards, steps, seed_i)
                samples = samples * STEPS // steps  # claims the full shard
            elif name == attack and attack == "other data":
                other = seed_for(run, number + 1000, i)
                delta, samples, seconds = train(job, weights, (i + 1) % shards, shards, STEPS, other)
            elif name == attack:  # a copier trains nothing
                delta = raw["honest-0"] if attack == "copier (peer)" or last is None else last
                samples, seconds = claims["honest-0"], 0.0
            else:
                delta, samples, seconds = train(job, weights, i, shards, STEPS, seed_i)
            train_s += seconds
            raw[name], claims[name] = delta, samples
            blob = feedback[name].encode({k: v.clone() for k, v in delta.items()}, {}, args.compression)
            uploads[name] = loads(blob)[0]
        cheater = attack if attack != "turns lazy H/2" or number >= TURNS else None  # who cheats this round
        sizes = {n: delta_norm(u) for n, u in uploads.items()}
        for name in names:  # each upload's norm against the round's others' median (what the intake records)
            usual = statistics.median(sizes[o] for o in names if o != name)
            (attacker_sizes if name == cheater else honest_sizes).append(sizes[name] / max(usual, 1e-30))
        started = time.process_time()
        owners = dict(enumerate(names))
        failed: set[str] = set()
        dense = {i: work.dense_norm(uploads[n], args.compression) for i, n in owners.items()}
        marked = work.short(
            {i: sizes[n] for i, n in owners.items()},
            {key: {"steps": STEPS} for key in owners},
            {i: size for i, size in dense.items() if size is not None},
        )
        for i in marked:
            marks[owners[i] == cheater] += 1
        for shard in work.draw(owners, records, args.rate, marked):
            name = owners[shard]
            replayed, samples = work.replay(
                job, weights, shard=shard, shards=shards, steps=STEPS, lr=LR, optimizer="adamw",
                seed=seed_for(run, number, shard),
            )  # fmt: skip
            why = work.mismatch(uploads[name], replayed, args.compression)
            seen = work.similarity(uploads[name], replayed, args.compression) or (1.0, 1.0)
            (attacker if name == cheater else honest_seen).append(seen)
            if why is None and claims[name] > samples:
                why = "samples"
            checked += 1
            if name == cheater:
                cheats_checked += 1
            if why is not None:
                failed.add(name)
        check_s += time.process_time() - started
        for name in names:
            if name == cheater:
                cheats += 1
                if name in failed:
                    cheats_caught += 1
                    caught_round = caught_round or number
            else:
                honest_shards += 1
                honest_rejected += name in failed
        for name in names:
            records[name] = 0 if name in failed else records[name] + 1
        kept = [(float(claims[n]), uploads[n]) for n in names if n not in failed]
        if kept:
            before = {k: v.clone() for k, v in weights.items()}
            weights = merger.aggregate({k: v.clone() for k, v in weights.items()}, iter(kept))
            last = {k: weights[k] - before[k] for k in weights if weights[k].is_floating_point()}
    return {
        "caught_round": caught_round,
        "cheats": cheats,
        "cheats_checked": cheats_checked,
        "cheats_caught": cheats_caught,
        "honest_shards": honest_shards,
        "honest_rejected": honest_rejected,
        "train_s": train_s,
        "check_s": check_s,
        "checked": checked,
        "trained": shards * args.rounds,
        "attacker": attacker,
        "honest": honest_seen,
        "honest_marked": marks[0],
        "cheats_marked": marks[1],
        "attacker_sizes": attacker_sizes,
        "honest_sizes": honest_sizes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--honest", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.1, help="init --work-check RATE")
    p.add_argument("--compression", default="topk:0.01+int2@4096")
    p.add_argument("--only", nargs="*", default=None, help="only these rows: honest and/or attacks")
    p.add_argument(
        "--identities", nargs="*", choices=["new", "veteran"], default=["new", "veteran"],
        help="which rows: identities on probation, veterans checked at the steady rate, or both",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.veteran = {kind == "veteran" for kind in args.identities}
    torch.set_num_threads(1)
    started = time.time()
    rows: dict[str, dict] = {}
    plan: list[tuple[str, str | None, bool]] = []
    for name in args.only or ("honest", *ATTACKS):
        for veteran in (False, True):
            if veteran not in args.veteran:
                continue
            if name == "honest":
                plan.append((f"honest ({'steady' if veteran else 'new'})", None, veteran))
            else:
                plan.append((f"{name} ({'veteran' if veteran else 'new'})", name, veteran))
    for label, attack, veteran in plan:
        runs = [simulate(args, attack, seed, veteran) for seed in range(args.seeds)]
        total = {
            k: sum(r[k] for r in runs)
            for k in runs[0]
            if k not in ("caught_round", "attacker", "honest", "attacker_sizes", "honest_sizes")
        }
        seen = {kind: [x for r in runs for x in r[kind]] for kind in ("attacker", "honest")}
        rows[label] = {
            **total,
            "recall": sum(r["caught_round"] is not None for r in runs) / len(runs) if attack else None,
            "first_caught": [r["caught_round"] for r in runs],
            "check_share": total["check_s"] / max(total["train_s"], 1e-9),
            **{f"{kind} {stat}": _range(values) for kind, values in seen.items() for stat in ("cosine",)},
            **{f"{kind} norm": _range([r for _, r in values]) for kind, values in seen.items()},
            **{
                f"{kind} size": _quantiles([x for r in runs for x in r[f"{kind}_sizes"]])
                for kind in ("attacker", "honest")
            },
        }
        print(label, json.dumps(rows[label]), file=sys.stderr, flush=True)
    honest = {k: sum(r[k] for r in rows.values()) for k in ("honest_shards", "honest_rejected")}
    document = {
        "rounds": args.rounds,
        "seeds": args.seeds,
        "rate": args.rate,
        "compression": args.compression,
        "rows": rows,
        "honest_rejected": honest,
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        print(json.dumps(document, indent=1))
        return 0
    header = [
        "scenario", f"recall in {args.rounds} rounds", "first caught (round, per seed)",
        "cheating shards checked / caught / sent", "honest shards rejected", "shards replayed / trained",
        "check CPU s / training CPU s",
        "cosine, honest", "norm ratio, honest", "cosine, attacker", "norm ratio, attacker",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- | --- | --- | --- |")
    for label, row in rows.items():
        recall = "" if row["recall"] is None else f"{row['recall']:.2f}"
        cheats = (
            f"{row['cheats_checked']} / {row['cheats_caught']} / {row['cheats']}" if row["cheats"] else ""
        )
        print(
            f"| {label} | {recall} | {row['first_caught'] if row['cheats'] else ''} | {cheats} | "
            f"{row['honest_rejected']} / {row['honest_shards']} | {row['checked']} / {row['trained']} | "
            f"{row['check_share']:.1%} | "
            f"{row['honest cosine']} | {row['honest norm']} | "
            f"{row['attacker cosine']} | {row['attacker norm']} |"
        )
    print(f"\nhonest shards rejected, all scenarios: {honest['honest_rejected']} / {honest['honest_shards']}")
    share = statistics.median(r["check_share"] for r in rows.values())
    print(f"{time.time() - started:.0f} s; median check share {share:.1%}")
    return 0


def _quantiles(values: list[float]) -> list[float] | None:
    """min, 5th percentile, median, 95th percentile, max; None if none."""
    if not values:
        return None
    ordered = sorted(values)
    pick = [
        0,
        round(0.05 * (len(ordered) - 1)),
        (len(ordered) - 1) // 2,
        round(0.95 * (len(ordered) - 1)),
        -1,
    ]
    return [round(ordered[i], 3) for i in pick]


def _range(values: list) -> list[float] | None:
    """[min, max] of cosines (pairs: their first) or of ratios, rounded; None if none."""
    flat = [v[0] if isinstance(v, tuple) else v for v in values]
    return [round(min(flat), 4), round(max(flat), 4)] if flat else None


if __name__ == "__main__":
    sys.exit(main())
