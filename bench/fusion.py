"""Branch, train apart, fuse (``init --from``, ``fuse``): eval loss per domain against one run on the union.

    python bench/fusion.py [--seed-rounds 6] [--rounds 12] [--volunteers 2] [--local-steps 20]
                           [--layers 2] [--width 64] [--seeds 1] [--json]

Two domains found on any machine with Python: code (the standard library's ``*.py`` files) and
English prose (the text of the docs topics ``pydoc`` shows, ``pydoc_data.topics``; license files
where that is missing), each split into training files and held-out files. Simulated in one
process with crowdtrain's own pieces, as the other quality benchmarks are: charlm (2 layers,
width 64, context 64), every round each of ``--volunteers`` volunteers trains ``--local-steps``
steps on its shard with ``volunteer.trainer.train_shard`` (AdamW, lr 3e-3, inner state kept) and
FedAvg merges the deltas.

1. seed: ``--seed-rounds`` rounds on the mix of both domains;
2. two branches from the seed (``init --from seed``): ``--rounds`` rounds each on one domain;
3. union: from the seed, ``2 * --rounds`` rounds on the mix, the same samples as both branches;
4. fused: ``average`` (``coordinator.runs.fusion.average``, equal weights) and the ensembles
   (``jobs.mixture.Mixture``) with uniform and posterior weights (Branch-Train-Merge).

Eval loss (nats per byte) on each domain's held-out files (``evaluate_corpus``, fixed windows)
and on the mix (the mean of the two domains: equal parts of each). Evaluation cost: the fastest of
five evaluations of each model (taking turns) on the same fixed windows of both domains, against
the median of the single models.
BTM's goal: the posterior ensemble at or below the union run on the mix and on each domain, and
below both branches on the mix. "union, half" is the union run after ``--rounds`` rounds: the
samples of one branch, so the wall-clock time of the branches trained side by side.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coordinator.merging.strategies import make_strategy
from coordinator.runs.fusion import average
from jobs import load_job
from jobs.charlm import _read_local
from jobs.language import evaluate_windows, held_out_windows
from jobs.mixture import Mixture
from volunteer.trainer import seed_for, train_shard

CONTEXT, BATCH = 64, 16
SINGLE = ("seed", "branch code", "branch prose", "average", "union", "union, half")  # one forward pass
DOMAIN_BYTES = 450_000  # of each domain, before the held-out fifth is set apart
HELD_OUT_EVERY = 5
EVAL_BATCHES = 24  # 24 x 16 windows of 64 bytes: about 25k predictions per domain
DOMAINS = ("code", "prose")


def prose_texts() -> list[str]:
    """English prose every Python has: pydoc's topics; license and readme files where they are missing."""
    try:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    except ImportError:
        patterns = [os.path.join(sys.prefix, "**", "LICENSE*"), "/usr/share/common-licenses/*"]
        files = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)})
        return [Path(p).read_text(errors="replace") for p in files if os.path.isfile(p)]


def code_texts() -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return [Path(p).read_text(errors="replace") for p in files]


def write_domains(folder: Path) -> None:
    """``train/DOMAIN_N.txt`` and ``eval/DOMAIN_N.txt``: every HELD_OUT_EVERY-th text held out."""
    for where in ("train", "eval"):
        (folder / where).mkdir(parents=True)
    for domain, texts in (("code", code_texts()), ("prose", prose_texts())):
        budget = DOMAIN_BYTES
        for number, text in enumerate(texts):
            if budget <= 0:
                break
            text = text[:budget]
            budget -= len(text.encode())
            where = "eval" if number % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
            (folder / where / f"{domain}_{number:04d}.txt").write_text(text)
        if budget > DOMAIN_BYTES // 2:
            raise SystemExit(f"too little {domain} text on this machine ({DOMAIN_BYTES - budget} bytes)")


def model_args(args: argparse.Namespace) -> dict[str, int]:
    return {"layers": args.layers, "width": args.width, "heads": 4, "context": CONTEXT, "batch_size": BATCH}


def make_job(folder: Path, corpus: str, seed: int, model: dict[str, int]):
    # eval_every: the whole glob trains (held-out text is in eval/); the job's own split keeps 1 in 1000
    args = {
        **model,
        "corpus": str(folder / "train" / corpus),
        "eval_every": 1000,
        "eval_batches": EVAL_BATCHES,
    }
    return load_job("charlm", {**args, "seed": seed, "max_bytes": 2 * DOMAIN_BYTES, "max_files": 10_000})


def train(job, weights, rounds: int, args: argparse.Namespace, tag: str) -> list[dict[str, torch.Tensor]]:
    """The weights after each of ``rounds`` FedAvg rounds of ``--volunteers`` shards; inner state kept."""
    after = []
    merger = make_strategy("fedavg")
    states: dict[int, dict | None] = dict.fromkeys(range(args.volunteers))
    for number in range(1, rounds + 1):
        deltas = []
        for volunteer in range(args.volunteers):
            result = train_shard(
                job,
                weights,
                shard=volunteer,
                shards=args.volunteers,
                steps=args.local_steps,
                lr=3e-3,
                device=torch.device("cpu"),
                seed=seed_for(tag, number, volunteer),
                optimizer_state=states[volunteer],
            )
            states[volunteer] = result.optimizer_state
            deltas.append((float(result.samples), result.delta))
        weights = merger.aggregate({k: v.clone() for k, v in weights.items()}, iter(deltas))
        after.append(weights)
    return after


def evaluate(job, model: torch.nn.Module, folder: Path) -> dict[str, float]:
    """Eval loss per domain (``evaluate_corpus`` on its held-out files) and on the mix (their mean)."""
    losses = {
        d: job.evaluate_corpus(model, str(folder / "eval" / f"{d}_*.txt"))["eval_loss"] for d in DOMAINS
    }
    losses["mix"] = statistics.fmean(losses[d] for d in DOMAINS)
    return losses


def forward_seconds(models: dict[str, torch.nn.Module], windows, repeats: int = 5) -> dict[str, float]:
    """Each model's fastest of ``repeats`` evaluations on the same fixed windows: its compute.

    The models take turns, so a busy moment of a shared machine slows all of them, not one.
    """
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            evaluate_windows(model, windows)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def run_seed(args: argparse.Namespace, folder: Path, seed: int) -> dict:
    """Every model of one seed: its losses and evaluation seconds."""
    jobs = {
        corpus: make_job(folder, glob_, seed, model_args(args))
        for corpus, glob_ in (("mix", "*.txt"), *((d, f"{d}_*.txt") for d in DOMAINS))
    }
    start = {k: v.detach().clone() for k, v in jobs["mix"].build_model().state_dict().items()}
    began = time.perf_counter()
    seeded = train(jobs["mix"], start, args.seed_rounds, args, f"seed-{seed}")[-1]
    branches = {d: train(jobs[d], seeded, args.rounds, args, f"branch-{d}-{seed}")[-1] for d in DOMAINS}
    union = train(jobs["mix"], seeded, 2 * args.rounds, args, f"union-{seed}")
    training = time.perf_counter() - began

    def model_of(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = jobs["mix"].build_model()
        model.load_state_dict(weights)
        return model

    members = [model_of(branches[d]) for d in DOMAINS]
    models = {
        "seed": model_of(seeded),
        "branch code": members[0],
        "branch prose": members[1],
        "average": model_of(average([branches[d] for d in DOMAINS], [0.5, 0.5])),
        "ensemble uniform": Mixture(members, [0.5, 0.5]),
        "ensemble posterior": Mixture(members, [0.5, 0.5], posterior=True),
        "union": model_of(union[-1]),
        "union, half": model_of(union[args.rounds - 1]),
    }
    text = _read_local(str(folder / "eval" / "*.txt"), jobs["mix"].config)
    windows = held_out_windows(text, CONTEXT + 1, BATCH, 0, EVAL_BATCHES)
    return {
        "losses": {name: evaluate(jobs["mix"], model, folder) for name, model in models.items()},
        "eval_seconds": forward_seconds(models, windows),
        "train_seconds": training,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed-rounds", type=int, default=6)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--volunteers", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64, help="a multiple of 4 (4 heads)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="crowdtrain-fusion-") as tmp:
        folder = Path(tmp)
        write_domains(folder)
        per_seed = [run_seed(args, folder, seed) for seed in range(args.seeds)]
    names = list(per_seed[0]["losses"])
    table = {
        name: {k: statistics.fmean(s["losses"][name][k] for s in per_seed) for k in (*DOMAINS, "mix")}
        for name in names
    }
    eval_seconds = {name: statistics.fmean(s["eval_seconds"][name] for s in per_seed) for name in names}
    samples = args.volunteers * args.local_steps * BATCH
    document = {
        "settings": {
            **vars(args),
            "model": model_args(args),
            "domain_bytes": DOMAIN_BYTES,
            "eval_batches": EVAL_BATCHES,
        },
        "samples": {
            "seed": args.seed_rounds * samples,
            "each branch": args.rounds * samples,
            "union": 2 * args.rounds * samples,
            "union, half": args.rounds * samples,
        },
        "eval_loss": table,
        "eval_seconds": eval_seconds,
        "goal": goal(table),
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(report(document))
    return 0


def goal(table: dict[str, dict[str, float]]) -> dict[str, bool]:
    """BTM's result, checked: posterior ensemble <= union everywhere, and below both branches on the mix."""
    posterior, union = table["ensemble posterior"], table["union"]
    return {
        "posterior <= union on the mix and each domain": all(
            posterior[k] <= union[k] for k in (*DOMAINS, "mix")
        ),
        "posterior < both branches on the mix": all(
            posterior["mix"] < table[f"branch {d}"]["mix"] for d in DOMAINS
        ),
    }


def report(document: dict) -> str:
    table, seconds = document["eval_loss"], document["eval_seconds"]
    one = statistics.median(seconds[name] for name in SINGLE)
    lines = [
        "| model | code | prose | mix | eval seconds (x one model) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['code']:.3f} | {row['prose']:.3f} | {row['mix']:.3f} | "
            f"{seconds[name]:.2f} ({seconds[name] / one:.2f}x) |"
        )
    lines.append("")
    lines.append(f"samples: {document['samples']}")
    lines += [f"goal: {what}: {'met' if ok else 'MISSED'}" for what, ok in document["goal"].items()]
    lines.append(f"({document['seconds']} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
