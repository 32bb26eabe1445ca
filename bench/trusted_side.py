"""Trusted-side CPU per accepted voice: probe judging of every voice against a sample (``--probe-voices``).

    python bench/trusted_side.py [--voices 16 64 1000] [--limits 16 32 64] [--json]
    python bench/trusted_side.py --split
    python bench/trusted_side.py --memory --voices 8 --job-arg layers=8 --job-arg width=1024 --job-arg heads=8

One private redis-server; everything else runs in this process with the aggregator's own code:
``coordinator init`` makes a charlm run of about 1M parameters with the default codec and
``--verify probe``, ``Rounds.open`` posts a round of V shards, V voices' uploads (encoded as a
volunteer does, ``ErrorFeedback.encode``) are stored, checked as the intake checks each one
(``intake._check``: decode, values, norm; and the sketch the intake keeps for the merge, where it
does) and counted with ``accept_many`` with the facts the intake records, and
``Aggregator.aggregate`` judges and merges the round (norm screen, copy check,
probe judging, merge, evaluation, publish, checkpoint). The figure is this process's CPU time
(user + system) for the intake's checks and that call, divided by V; the copy check's share is
timed apart. The file runs unchanged on a commit before the intake recorded facts (for a
side-by-side: copy it into that checkout).

Each V runs twice on the same uploads and reputations: ``all`` (``--probe-voices 10000``, every
voice judged: the baseline) and ``sampled`` (the default ``--probe-voices``). The voices: 5% new
(never judged), the rest trusted (reputation 0.9); 10% of the trusted ones cheat (they send an
honest delta negated). Honest deltas are 8 real charlm trainings, each voice one of them plus
its own noise (cosine about 0.9 with it), so no two are copies. Reported per arm: CPU seconds per
voice, the round's total, the voices judged, the probe passes (base, gains and costs), and what
happened to the cheaters (how many were judged): those judged must
be rejected with ``probe`` and, when sampled, fall to reputation 0.

``--memory`` (issue 27: a 100M model at 8 voices, the aggregator under 4x the model) also
reports the peak RSS of the intake's checks and the aggregation above the RSS before them, as
a multiple of the model's float32 bytes, every voice judged (one arm). The honest trainings run
in a child process that writes the uploads to files, so the freed memory of training is not
in this process's heap for the aggregation to reuse unseen; the peak is VmHWM, reset
(``/proc/self/clear_refs``) just before the aggregator is made. The baseline holds this
process's own copy of the model (the aggregator builds its own, which is counted).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.harness import Cluster

JOB_ARGS = {"layers": 4, "width": 128, "heads": 4, "context": 32, "batch_size": 8, "max_files": 40}
HONEST = 8
NEW, CHEATERS = 0.05, 0.10
TRUSTED_REPUTATION = 0.9
ALL = 10_000


def defaults() -> tuple[str, int]:
    """init's codec and --probe-voices (from where a commit before the run config table kept them)."""
    try:
        from broker.run_config import DEFAULT_COMPRESSION, DEFAULT_PROBE_VOICES
    except ImportError:
        from cli.coordinator import DEFAULT_COMPRESSION  # type: ignore[attr-defined, no-redef]
        from coordinator.merging.sampling import DEFAULT_PROBE_VOICES  # type: ignore[attr-defined, no-redef]
    return DEFAULT_COMPRESSION, DEFAULT_PROBE_VOICES


def trained_deltas(job, weights, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` real honest deltas: one short training of each shard of ``count``."""
    from volunteer.trainer import seed_for, train_shard

    return [
        train_shard(
            job, weights, shard=i, shards=count, steps=5, lr=3e-3, device=torch.device("cpu"),
            seed=seed_for("trusted-side", 1, i),
        ).delta
        for i in range(count)
    ]  # fmt: skip


def voice_delta(honest: list[dict[str, torch.Tensor]], index: int, cheat: bool) -> dict[str, torch.Tensor]:
    """One voice's delta: an honest one plus noise of half its norm (negated for a cheater)."""
    gen = torch.Generator().manual_seed(index)
    source = honest[index % len(honest)]
    out = {}
    for name, tensor in source.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        noise = torch.randn(tensor.shape, generator=gen) * (
            0.5 * float(tensor.std()) if tensor.numel() > 1 else 0
        )
        out[name] = (-1 if cheat else 1) * (tensor + noise)
    return out


def population(count: int) -> tuple[list[str], set[str], set[str]]:
    """Voice names, the new ones and the cheaters (trusted, every tenth of the trusted)."""
    names = [f"v{i:04d}" for i in range(count)]
    new = {name for i, name in enumerate(names) if i % round(1 / NEW) == 1}
    trusted = [name for name in names if name not in new]
    cheaters = {name for i, name in enumerate(trusted) if i % round(1 / CHEATERS) == 3}
    return names, new, cheaters


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_round(
    cluster: Cluster, voices: int, limit: int, uploads: list[bytes], tag: str, job_args: dict | None = None
) -> dict:
    """Init a run, post a round of ``voices`` shards, count the uploads, aggregate it: the figures."""
    from broker import blobs, keys
    from coordinator.merging import aggregator as aggregator_module
    from coordinator.merging import verification
    from coordinator.merging.aggregator import Aggregator
    from coordinator.rounds import intake
    from coordinator.store import Store

    try:  # the intake records each copy's norm and meta (a commit before it: nothing to record)
        from coordinator.rounds.state import Fact
    except ImportError:
        Fact = None

    run = f"{tag}-{voices}"
    args = ["init", "--run", run, "--job", "charlm", "--shards", str(voices), "--verify", "probe"]
    args += ["--probe-voices", str(limit), "--max-share", "1"]
    for key, value in (job_args or JOB_ARGS).items():
        args += ["--job-arg", f"{key}={value}"]
    done = cluster.coordinator(*args)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    store = Store(cluster.client)
    store.rounds.open(run, voices, voices, 3600.0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the trusted side's own peak
    rss_before = _status_kib("VmRSS")
    names, new, cheaters = population(voices)
    store.set_reputations({n: TRUSTED_REPUTATION for n in names if n not in new})
    for name in new:  # never judged, whatever an earlier arm did
        cluster.client.hdel(keys.volunteer(name), "reputation")
    aggregator = Aggregator(store, Path(cluster.env["CROWDTRAIN_HOME"]))
    context = aggregator.contexts[run]  # the run's job and model are built once per aggregator
    intake_cpu = 0.0
    for shard, (name, blob) in enumerate(zip(names, uploads, strict=True)):
        copy = keys.accepted_upload(run, 1, name, shard, f"{shard:032x}")
        blobs.write(cluster.client, copy, blob)
        started = time.process_time()  # what the intake does with each upload: decode and check it
        checked = intake._check(bytearray(blob), context, 0, shard)
        reason, meta, norm, delta = (*checked[:3], checked[3] if len(checked) > 3 else None)
        del checked  # the decoded delta is not held past its sketch, as in the intake
        keep = getattr(aggregator.intake, "keep_sketch", None)  # and, where it keeps them, sketch it
        if keep is not None and delta is not None:
            keep(context, run, 1, copy, norm, delta)
        del delta
        intake_cpu += time.process_time() - started
        assert reason is None, reason
        facts = [Fact(run, 1, copy, norm, meta)] if Fact is not None else []
        accept = (run, 1, shard, copy, f"{shard:064x}", name)
        outcome, _ = store.rounds.accept_many([accept], **({"facts": facts} if facts else {}))[0]
        assert outcome == "accepted", outcome
    copy_seconds = [0.0]
    real = aggregator_module.check_copies

    def timed(*a, **k):  # the copy check's own CPU, timed apart
        started = time.process_time()
        try:
            return real(*a, **k)
        finally:
            copy_seconds[0] += time.process_time() - started

    aggregator_module.check_copies = timed
    passes = [0]
    real_probe = verification.probe_loss

    def counted(*a, **k):  # every probe pass: the base's, each gain's and each cost's
        passes[0] += 1
        return real_probe(*a, **k)

    verification.probe_loss = counted
    started, wall = time.process_time(), time.perf_counter()
    try:
        summary = aggregator.aggregate(run, 1)
    finally:
        aggregator_module.check_copies = real
        verification.probe_loss = real_probe
    cpu, wall = time.process_time() - started + intake_cpu, time.perf_counter() - wall
    peak_above_mib = (_status_kib("VmHWM") - rss_before) / 1024
    assert summary is not None and summary["status"] == "done", summary
    rejected = {
        json.loads(e)["volunteer"]: json.loads(e)["reason"]
        for e in cluster.client.hvals(keys.round_rejections(run, 1))
    }
    after = store.reputations(names)
    judged = sum(1 for n in names if after.get(n) != (None if n in new else TRUSTED_REPUTATION))
    caught = sorted(n for n in cheaters if n in rejected)
    return {
        "voices": voices,
        "arm": tag,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_per_voice_ms": 1000 * cpu / voices,
        "copy_check_s": copy_seconds[0],
        "intake_s": intake_cpu,
        "judged": judged,
        "probe_passes": passes[0],
        "cheaters": len(cheaters),
        "cheaters_judged": sum(1 for n in cheaters if after.get(n) != TRUSTED_REPUTATION),
        "caught": len(caught),
        "caught_with_probe": sum(1 for n in caught if rejected[n].startswith("probe")),
        "caught_at_zero": sum(1 for n in caught if after.get(n) == 0.0),
        "honest_rejected": sum(1 for n in rejected if n not in cheaters),
        "peak_above_mib": peak_above_mib,
    }


SPLIT_JOBS = {  # the matrix defaults are chosen on (tests/fixtures/jobs_small.py, charlm, gpt)
    "linear (17 parameters)": ("tests.fixtures.jobs_small:linear", {}),
    "click (zero-initialised, sparse)": ("tests.fixtures.jobs_small:click", {}),
    "mlp": ("tests.fixtures.jobs_small:mlp", {}),
    "charlm (this bench's)": ("charlm", JOB_ARGS),
    "gpt nano": ("gpt", {"preset": "nano", "max_files": 60, "eval_batches": 4}),
}


def split(repeats: int = 10) -> list[dict]:
    """Per-voice costs of the trusted side's steps on a job matrix, in CPU ms (one thread).

    Every voice, judged or not, is decoded three times (the intake's check, judging or the copy
    sketch, the merge) and sketched once; a judged voice also pays its probe pass
    (``Prober.gain``). The resolution's probes (``Prober.cost``, at most 9 a round where a rule
    fires) are the round's, not a voice's, and are left out. (Before 2026-12-07 a judged voice
    paid two probes and five reads.)
    """
    DEFAULT_COMPRESSION, _ = defaults()
    from coordinator.merging.verification import Prober, sketch
    from jobs import load_job
    from serialization import loads
    from volunteer.feedback import ErrorFeedback

    def cpu_ms(fn) -> float:
        fn()
        started = time.process_time()
        for _ in range(repeats):
            fn()
        return 1000 * (time.process_time() - started) / repeats

    rows = []
    for label, (name, job_args) in SPLIT_JOBS.items():
        job = load_job(name, job_args)
        weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        delta = {
            k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in weights.items() if v.is_floating_point()
        }
        blob = ErrorFeedback().encode(delta, {"samples": 8}, DEFAULT_COMPRESSION)
        decoded = loads(blob)[0]
        prober = Prober(job, weights)
        probe = cpu_ms(partial(prober.gain, decoded, 1 / 64))
        read, sk = cpu_ms(partial(loads, blob)), cpu_ms(partial(sketch, decoded))
        params = sum(t.numel() for t in weights.values())
        rows.append({
            "job": label, "params": params, "probe_ms": probe, "read_ms": read, "sketch_ms": sk,
            "judged_ms": probe + 3 * read + sk, "unjudged_ms": 3 * read + sk,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voices", type=int, nargs="+", default=[16, 64, 1000])
    parser.add_argument(
        "--limits",
        type=int,
        nargs="+",
        default=None,
        help="--probe-voices of the sampled arms (default: the default)",
    )
    parser.add_argument(
        "--split", action="store_true", help="only the per-voice costs of each step, on 3 jobs"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--job-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="charlm's size (default: the bench's)",
    )
    parser.add_argument("--memory", action="store_true", help="every voice judged only, with the peak RSS")
    parser.add_argument("--write-uploads", metavar="DIR", help=argparse.SUPPRESS)  # --memory's child
    args = parser.parse_args(argv)
    job_args = {**JOB_ARGS, **{k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.job_arg)}}
    torch.set_num_threads(1)
    if args.split:
        print("| job | params | probe pass ms | read (decode) ms | sketch ms | judged voice ms "
              "(a probe, 3 reads, sketch) | unjudged voice ms (3 reads, sketch) | ratio |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in split():
            print(f"| {row['job']} | {row['params']:,} | {row['probe_ms']:.2f} | {row['read_ms']:.2f} | "
                  f"{row['sketch_ms']:.2f} | {row['judged_ms']:.1f} | {row['unjudged_ms']:.1f} | "
                  f"{row['judged_ms'] / row['unjudged_ms']:.1f}x |")  # fmt: skip
        return 0
    DEFAULT_COMPRESSION, DEFAULT_PROBE_VOICES = defaults()
    from jobs import load_job
    from volunteer.feedback import ErrorFeedback

    job = load_job("charlm", {**job_args, "seed": 0})
    weights = {k: v.detach().clone() for k, v in job.build_model().state_dict().items()}
    params = sum(t.numel() for t in weights.values())

    def make_uploads(voices: int) -> list[bytes]:
        names, _, cheaters = population(voices)
        meta = {"samples": 8, "train_loss": 3.0, "seconds": 1.0, "base_version": 0}
        return [
            ErrorFeedback().encode(voice_delta(honest, i, name in cheaters), meta, DEFAULT_COMPRESSION)
            for i, name in enumerate(names)
        ]

    if args.write_uploads or not args.memory:
        honest = trained_deltas(job, weights, HONEST)
    if args.write_uploads:
        for voices in args.voices:
            for i, blob in enumerate(make_uploads(voices)):
                Path(args.write_uploads, f"{voices}-{i}").write_bytes(blob)
        return 0
    rows = []
    with Cluster("trusted-side") as cluster:
        for voices in args.voices:
            if args.memory:  # trained in a child: its freed memory is not this heap's
                import subprocess
                import tempfile

                with tempfile.TemporaryDirectory() as folder:
                    child = [sys.executable, __file__, "--write-uploads", folder, "--voices", str(voices)]
                    subprocess.run(child + [f"--job-arg={pair}" for pair in args.job_arg], check=True)
                    uploads = [Path(folder, f"{voices}-{i}").read_bytes() for i in range(voices)]
            else:
                uploads = make_uploads(voices)
            arms = [("all", ALL)]
            if not args.memory:
                arms += [(f"sampled{n}", n) for n in args.limits or [DEFAULT_PROBE_VOICES]]
            for tag, limit in arms:
                rows.append(one_round(cluster, voices, limit, uploads, tag, job_args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json or args.memory:
        model_mib = 4 * params / 2**20
        for row in rows:
            row["peak_above_model"] = row["peak_above_mib"] / model_mib
        print(json.dumps({"params": params, "model_mib": model_mib, "rows": rows}))
        return 0
    print(f"## Trusted-side CPU per voice, charlm {params / 1e6:.2f}M params, default codec, "
          f"--verify probe, --probe-voices {DEFAULT_PROBE_VOICES} (sampled) against every voice judged, "
          "1 thread\n")  # fmt: skip
    print("| voices | arm | judged | CPU s/round | CPU ms/voice | copy check s "
          "| cheaters caught (probe, rep 0) | honest rejected | ratio all/sampled |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for row in rows:
        base = next(r for r in rows if r["voices"] == row["voices"] and r["arm"] == "all")
        print(f"| {row['voices']} | {row['arm']} | {row['judged']} | {row['cpu_s']:.2f} | "
              f"{row['cpu_per_voice_ms']:.1f} | {row['copy_check_s']:.2f} | "
              f"{row['caught']}/{row['cheaters']} "
              f"({row['caught_with_probe']}, {row['caught_at_zero']}) | {row['honest_rejected']} | "
              f"{base['cpu_s'] / row['cpu_s']:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
