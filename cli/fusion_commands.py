"""The ``fuse`` and ``evaluate`` sub-commands, and ``sample`` and ``export`` of an ensemble.

``sample`` and ``export`` of a run stay in ``cli.commands``; the handlers here look
the name up first and hand a run on to them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from broker.run_config import RunConfig
from cli import commands
from cli.commands import connect
from coordinator.errors import UsageError
from coordinator.runs import checkpoints, fusion
from coordinator.runs.creation import create_run, first_line
from coordinator.store import Store
from jobs import Job, JobError, load_job
from serialization import dumps

MANIFEST = "manifest.json"


def fuse(args: argparse.Namespace) -> dict[str, Any]:
    """Check every member and weight first, then write the fused run or the ensemble's record."""
    members = fusion.parse_members(args.runs)
    weights = fusion.parse_weights(args.weights, len(members), args.method)
    conn = connect(args)
    store, home = conn.store, conn.settings.home
    configs = [store.run_config(m.run) for m in members]  # an unknown run is named
    versions = [fusion.resolve_version(store, m) for m in members]
    fusion.check_new_name(store, home, args.out, "--out")
    files = fusion.check_same_meaning(home, [m.run for m in members])
    if args.method == "average":
        assert isinstance(weights, list)
        return _average(conn, args, members, versions, configs, weights, files)
    jobs = {c.job for c in configs}
    if len(jobs) > 1:
        raise UsageError(f"an ensemble's runs train one job; these train {', '.join(sorted(jobs))}")
    job = load_job(configs[0].job, configs[0].job_args)
    fusion.check_ensemble_job(job, configs[0].job, weights)
    record = fusion.ensemble_record(args.out, configs[0].job, members, weights)
    path = fusion.save_ensemble(store, home, args.out, record)
    document = {
        "run": args.out,
        "method": "ensemble",
        "members": record["members"],
        "weights": weights,
        "record": str(path),
    }
    if not args.json:
        shown = weights if isinstance(weights, str) else ", ".join(f"{w:.3g}" for w in weights)
        print(
            f"created ensemble {args.out!r} of {', '.join(m.label() for m in members)} "
            f"(weights {shown}); a bare run name follows that run's current version"
        )
    return document


def _average(
    conn: commands.Connection,
    args: argparse.Namespace,
    members: list[fusion.Member],
    versions: list[int],
    configs: list[RunConfig],
    weights: list[float],
    files: dict[str, str],
) -> dict[str, Any]:
    """A new run whose version 0 is the weighted mean; it keeps the first member's settings."""
    store, home = conn.store, conn.settings.home
    labels = [f"{m.run} version {v}" for m, v in zip(members, versions, strict=True)]
    models = [fusion.version_weights(store, home, m.run, v) for m, v in zip(members, versions, strict=True)]
    fusion.check_same_shapes(list(zip(labels, models, strict=True)))
    merged = fusion.average(models, weights)
    first = configs[0]
    job = load_job(first.job, first.job_args)
    model = job.build_model()
    fusion.check_same_shapes([(labels[0], merged), (f"job {first.job!r}", model.state_dict())])
    model.load_state_dict(merged)
    initial = {k: float(v) for k, v in job.evaluate(model).items()}
    blob = dumps(merged, {"run": args.out, "version": 0})
    fused_from = {
        "method": "average",
        "members": [{"run": m.run, "version": v} for m, v in zip(members, versions, strict=True)],
        "weights": weights,
    }
    config = first.replace(
        initial=initial,
        initial_digest=hashlib.sha256(blob).hexdigest(),
        created_at=time.time(),
        fused_from=fused_from,
        branched_from=None,
    )
    create_run(store, home, args.out, config, blob, merged, files)
    document = {
        "run": args.out,
        "method": "average",
        "job": first.job,
        "members": fused_from["members"],
        "weights": weights,
        "initial": {"model_version": 0, **initial},
    }
    if not args.json:
        print(
            f"created run {args.out!r}, the weighted mean of {', '.join(labels)}: "
            f"initial eval_loss {initial.get('eval_loss', 0):.4f}; train it like any run"
        )
    return document


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The eval loss (and accuracy, where the job has it) of a run's version or of an ensemble."""
    conn = connect(args)
    store, home = conn.store, conn.settings.home
    record = fusion.read_ensemble(store, args.run)
    started = time.perf_counter()
    if record is not None:
        if args.version is not None:
            raise UsageError(_VERSION_OF_ENSEMBLE.format(name=args.run))
        ensemble = fusion.load_ensemble(store, home, args.run, record)
        metrics = _metrics(ensemble.job, ensemble.job_name, ensemble.model, args.data, args.run)
        detail: dict[str, Any] = {"members": ensemble.members, "forward_passes": len(ensemble.members)}
    else:
        config = store.run_config(args.run)
        version = _run_version(store, args.run, args.version)
        job = load_job(config.job, config.job_args)
        model = job.build_model()
        model.load_state_dict(fusion.version_weights(store, home, args.run, version))
        metrics = _metrics(job, config.job, model, args.data, args.run)
        detail = {"version": version, "forward_passes": 1}
    document = {
        "run": args.run,
        **metrics,
        **detail,
        "data": args.data,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not args.json:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        where = args.data or "the job's eval set"
        print(f"{args.run}: {shown} on {where}")
    return document


def _metrics(
    job: Job, job_name: str, model: torch.nn.Module, data: str | None, name: str
) -> dict[str, float]:
    """``evaluate`` on the held-out set, or ``evaluate_corpus`` on ``data``; a failure is one line."""
    if data is not None and not callable(getattr(job, "evaluate_corpus", None)):
        raise UsageError(f"job {job_name!r} cannot evaluate a corpus at a path (it has no evaluate_corpus)")
    try:
        raw = job.evaluate(model) if data is None else job.evaluate_corpus(model, data)  # type: ignore[attr-defined]
    except (UsageError, JobError):
        raise
    except (RuntimeError, ValueError) as e:  # an ensemble member that cannot read the inputs
        raise UsageError(f"cannot evaluate {name!r}: {first_line(e)}") from None
    return {k: float(v) for k, v in raw.items()}


def sample(args: argparse.Namespace) -> dict[str, Any]:
    """``coordinator sample`` of an ensemble: text from the mixture; a run goes to ``commands.sample``."""
    conn = connect(args)
    record = fusion.read_ensemble(conn.store, args.run)
    if record is None:
        return commands.sample(args)
    if args.version is not None:
        raise UsageError(_VERSION_OF_ENSEMBLE.format(name=args.run))
    ensemble = fusion.load_ensemble(conn.store, conn.settings.home, args.run, record)
    generate = getattr(ensemble.job, "generate", None)
    if not callable(generate):
        raise UsageError(f"job {ensemble.job_name!r} of ensemble {args.run!r} does not generate text")
    try:
        text = generate(
            ensemble.model, args.prompt, args.tokens, temperature=args.temperature, seed=args.seed
        )
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"cannot sample from ensemble {args.run!r}: {first_line(e)}") from None
    if not args.json:
        print(text)
    return {"run": args.run, "members": ensemble.members, "prompt": args.prompt, "text": text}


def export(args: argparse.Namespace) -> None:
    """``coordinator export`` of an ensemble: a folder with each member's file and a manifest."""
    conn = connect(args)
    record = fusion.read_ensemble(conn.store, args.run)
    if record is None:
        return commands.export(args)
    if args.version is not None:
        raise UsageError(_VERSION_OF_ENSEMBLE.format(name=args.run))
    out: Path = args.out
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UsageError(
            f"--out {out}: {args.run!r} is an ensemble, written as a folder (each member's "
            f"file and {MANIFEST}); name a folder that does not exist yet or is empty"
        )
    store, home = conn.store, conn.settings.home
    members = [fusion.Member(m["run"], m.get("version")) for m in record["members"]]
    weights = record["weights"]
    partial = out.with_name(f"{out.name}.partial{os.getpid()}")
    entries = []
    try:
        partial.mkdir(parents=True)
        for number, member in enumerate(members):
            version = fusion.resolve_version(store, member)
            name = f"{number}-{member.run}-v{version}.safetensors"
            weights_of = fusion.version_weights(store, home, member.run, version)
            meta = {"run": member.run, "version": str(version), "ensemble": args.run}
            checkpoints.export_float32(weights_of, partial / name, meta)
            weight = weights if isinstance(weights, str) else weights[number]
            entries.append({"run": member.run, "version": version, "weight": weight, "file": name})
        manifest = {
            "ensemble": args.run,
            "method": "ensemble",
            "job": record["job"],
            "weights": weights,
            "members": entries,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    except (OSError, SafetensorError) as e:
        raise UsageError(f"--out {out}: cannot write it ({e})") from None
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote ensemble {args.run} to {out}: {len(entries)} member files and {MANIFEST}")


def _run_version(store: Store, run: str, version: int | None) -> int:
    current = store.version(run)
    chosen = current if version is None else version
    if not 0 <= chosen <= current:
        raise UsageError(f"--version {chosen}: run {run!r} has versions 0 to {current}")
    return chosen


_VERSION_OF_ENSEMBLE = (
    "--version is for runs: ensemble {name!r} reads the versions its members name "
    "(fuse --runs A:3,B pins A at version 3; B follows its current one)"
)
