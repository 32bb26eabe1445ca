"""Model fusion: branch a run, merge runs by their weights (``average``) or by their outputs (``ensemble``).

A branch (``init --from RUN[:VERSION]``) is a run whose version 0 is a version of another run;
it trains apart with its own settings and data. ``fuse --method average`` makes a new run whose
version 0 is the weighted mean of its members' weights (a "model soup"), trained further like
any run. ``fuse --method ensemble`` makes an ensemble: no weights of its own, only a record of
its members, their weights and which versions it reads; ``jobs.mixture.Mixture`` serves it as
one model whose output distribution is the weighted mixture of the members'.

Where an ensemble lives: in Redis beside the runs (``ct:ensembles``, ``ct:ensemble:NAME``, a
JSON record; trusted side only) and on disk (``CROWDTRAIN_HOME/ensembles/NAME.json``, the same
record). Run and ensemble names share one namespace, so ``--run NAME`` names either.
A member given as ``RUN:V`` is pinned at version V; a bare ``RUN`` follows the run's current
version, read each time the ensemble is used.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from broker import keys
from coordinator.errors import RunExists, UsageError
from coordinator.runs import checkpoints
from coordinator.store import Store
from jobs import Job, load_job, outputs_of
from jobs.mixture import Mixture
from serialization import TensorDict, loads

METHODS = ("average", "ensemble")
POSTERIOR = "posterior"
ENSEMBLES_FOLDER = "ensembles"
# Files a run keeps beside its checkpoints that fix what its outputs mean: runs merged or
# branched must agree on them (two gpt runs with different tokenizers have the same shapes).
MEANING_FILES = ("tokenizer.json",)


@dataclass(frozen=True)
class Member:
    """One run of a fusion: pinned at ``version``, or following its current one (None)."""

    run: str
    version: int | None = None

    def label(self) -> str:
        return self.run if self.version is None else f"{self.run}:{self.version}"


def parse_member(text: str, flag: str) -> Member:
    """``RUN`` or ``RUN:VERSION``; a malformed one is a UsageError naming ``flag``."""
    run, colon, version = text.strip().partition(":")
    if not keys.NAME.fullmatch(run):
        raise UsageError(f"{flag} {text!r}: a run is named by 1-64 letters, digits, '.', '_' or '-'")
    if not colon:
        return Member(run)
    if not version.isascii() or not version.isdigit() or len(version) > 12:
        raise UsageError(f"{flag} {text!r}: the version after ':' must be a whole number, e.g. {run}:3")
    return Member(run, int(version))


def parse_members(text: str) -> list[Member]:
    """``--runs A,B[:V],...``: at least two members."""
    members = [parse_member(part, "--runs") for part in text.split(",") if part.strip()]
    if len(members) < 2:
        raise UsageError(f"--runs {text!r}: fusion needs at least two runs, e.g. --runs A,B")
    return members


def parse_weights(text: str | None, count: int, method: str) -> list[float] | str:
    """``--weights``: equal when not given, ``posterior`` (ensembles), else one number per member.

    Weights are non-negative and not all zero; they are normalised to sum to 1.
    """
    if text is None:
        return [1.0 / count] * count
    if text.strip() == POSTERIOR:
        if method != "ensemble":
            raise UsageError(
                "--weights posterior weighs each member's outputs: use it with --method ensemble"
            )
        return POSTERIOR
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise UsageError(f"--weights {text!r}: give numbers w1,w2,... or 'posterior'") from None
    if len(values) != count:
        raise UsageError(f"--weights {text!r}: {len(values)} weights for {count} runs; give one per run")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"--weights {text!r}: weights must be finite and not negative")
    total = sum(values)
    if total <= 0:
        raise UsageError(f"--weights {text!r}: at least one weight must be above zero")
    return [v / total for v in values]


# --- members' versions and weights -----------------------------------------------------------


def resolve_version(store: Store, member: Member) -> int:
    """The version ``member`` reads now: its pinned one (which must exist) or the run's current one."""
    current = store.version(member.run)  # an unknown run is an UnknownRun error naming it
    if member.version is None:
        return current
    if member.version > current:
        raise UsageError(f"{member.label()}: run {member.run!r} has versions 0 to {current}")
    return member.version


def version_weights(store: Store, home: Path, run: str, version: int) -> TensorDict:
    """A version's weights, from Redis or, once it left Redis, from its checkpoint on disk."""
    blob = store.model_blob(run, version)
    if blob is not None:
        weights, _ = loads(blob)
        return weights
    try:
        return checkpoints.load_version(home, run, version)
    except (OSError, SafetensorError) as e:
        folder = checkpoints.run_dir(home, run)
        raise UsageError(
            f"version {version} of run {run!r} is no longer in Redis and its checkpoint "
            f"under {folder} cannot be read ({e})"
        ) from None


def check_same_shapes(named: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> None:
    """Every model has the first's tensor names and shapes, else a UsageError naming the first difference."""
    first_label, first = named[0]
    for label, weights in named[1:]:
        missing = sorted(set(first) ^ set(weights))
        if missing:
            where = first_label if missing[0] in first else label
            raise UsageError(
                f"{first_label} and {label} are different architectures: only {where} has tensor "
                f"{missing[0]!r}"
            )
        for name, tensor in first.items():
            if tuple(tensor.shape) != tuple(weights[name].shape):
                raise UsageError(
                    f"{first_label} and {label} are different architectures: tensor {name!r} is "
                    f"{tuple(tensor.shape)} in one and {tuple(weights[name].shape)} in the other"
                )


def meaning_files(home: Path, run: str) -> dict[str, str]:
    """The run's files that fix what its outputs mean (its tokenizer), as saved by ``init``."""
    found = {}
    for name in MEANING_FILES:
        path = checkpoints.run_dir(home, run) / name
        if path.is_file():
            found[name] = path.read_text(encoding="utf-8")
    return found


def check_same_meaning(home: Path, runs: Sequence[str]) -> dict[str, str]:
    """The runs' tokenizers (if any) are one and the same; returns the first run's files."""
    first = meaning_files(home, runs[0])
    for run in runs[1:]:
        other = meaning_files(home, run)
        for name in sorted(set(first) | set(other)):
            if first.get(name) != other.get(name):
                raise UsageError(
                    f"runs {runs[0]!r} and {run!r} have different {name} files: their tokens mean "
                    "different things, so they cannot be fused"
                )
    return first


def average(models: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> TensorDict:
    """The weighted mean of each tensor (in float64, cast back); integer tensors must agree."""
    out: TensorDict = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            if any(not torch.equal(first, m[name]) for m in models[1:]):
                raise UsageError(f"tensor {name!r} holds integers that differ between the runs: no mean")
            out[name] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for model, weight in zip(models, weights, strict=True):
            total += float(weight) * model[name].double()
        out[name] = total.to(first.dtype)
    return out


# --- branches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Branch:
    """Where a branch starts: the parent run's version, weights, job and the files that give them meaning."""

    run: str
    version: int
    job: str
    job_args: dict[str, Any]
    weights: TensorDict
    files: dict[str, str]


def branch_source(
    store: Store, home: Path, spec: str, job: str | None, job_args: Mapping[str, Any]
) -> Branch:
    """``init --from RUN[:VERSION]``: the parent's version and job; its job arguments, updated."""
    member = parse_member(spec, "--from")
    config = store.run_config(member.run)
    version = resolve_version(store, member)
    if job is not None and job != config.job:
        raise UsageError(
            f"--job {job}: run {member.run!r} trains job {config.job!r}, and a branch keeps its "
            "parent's job (leave --job out)"
        )
    merged = {**(config.job_args), **job_args}
    weights = version_weights(store, home, member.run, version)
    return Branch(member.run, version, config.job, merged, weights, meaning_files(home, member.run))


def branch_model(
    job: Job, branch: Branch, run: str, files: Mapping[str, str]
) -> tuple[TensorDict, dict[str, float]]:
    """Version 0 of a branch: the parent's weights in the branch's model, and its evaluation.

    The branch's job arguments may change anything but the architecture (and the tokenizer).
    """
    model = job.build_model()
    check_same_shapes(
        [(f"run {branch.run!r}", branch.weights), (f"the job of run {run!r}", model.state_dict())]
    )
    for name, text in branch.files.items():
        if files.get(name, text) != text:
            raise UsageError(
                f"these --job-arg values give run {run!r} another {name} than its parent {branch.run!r} "
                f"has: add --job-arg tokenizer=PATH naming the parent's (runs/{branch.run}/{name})"
            )
    model.load_state_dict(branch.weights)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial = {k: float(v) for k, v in job.evaluate(model).items()}
    return weights, initial


# --- the shared namespace of runs and ensembles ----------------------------------------------------


def ensemble_path(home: Path, name: str) -> Path:
    return home / ENSEMBLES_FOLDER / f"{name}.json"


def read_ensemble(store: Store, name: str) -> dict[str, Any] | None:
    """The ensemble's record, or None when ``name`` is no ensemble."""
    raw = store.redis.get(keys.ensemble(name))
    if raw is None:
        return None
    record: dict[str, Any] = json.loads(raw)
    return record


def ensembles(store: Store) -> list[str]:
    return sorted(name.decode() for name in store.redis.smembers(keys.ensembles()))


def check_new_name(store: Store, home: Path, name: str, flag: str) -> None:
    """``name`` is free: no run, no ensemble, no folder or record on disk of either."""
    if not keys.NAME.fullmatch(name):
        raise UsageError(f"{flag} {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if name in store.runs() or store.redis.exists(keys.run_config(name)):
        raise RunExists(f"{flag} {name!r}: a run of that name exists already; choose another name")
    if read_ensemble(store, name) is not None:
        raise RunExists(f"{flag} {name!r}: an ensemble of that name exists already; choose another name")
    for path in (checkpoints.run_dir(home, name), ensemble_path(home, name)):
        if path.exists():
            raise RunExists(f"{flag} {name!r}: {path} exists already; choose another name")


def refuse_ensemble_name(store: Store, run: str) -> None:
    """A new run may not take an ensemble's name (``--run NAME`` would name both)."""
    if read_ensemble(store, run) is not None:
        raise RunExists(f"{run!r} is an ensemble already; choose another --run name")


def save_ensemble(store: Store, home: Path, name: str, record: Mapping[str, Any]) -> Path:
    """Claim ``name`` in Redis, then write the record on disk; if the disk refuses, the claim goes."""
    text = json.dumps(record, indent=2, sort_keys=True)
    if not store.redis.set(keys.ensemble(name), text, nx=True):
        raise RunExists(f"--out {name!r}: an ensemble of that name exists already; choose another name")
    path = ensemble_path(home, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial{os.getpid()}")
        partial.write_text(text + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as e:
        store.redis.delete(keys.ensemble(name))
        raise UsageError(f"cannot write the ensemble's record {path}: {e}") from None
    store.redis.sadd(keys.ensembles(), name)
    return path


def ensemble_record(
    name: str, job: str, members: Sequence[Member], weights: list[float] | str
) -> dict[str, Any]:
    return {
        "ensemble": name,
        "method": "ensemble",
        "job": job,
        "members": [{"run": m.run, "version": m.version} for m in members],
        "weights": weights,
        "created_at": time.time(),
    }


def check_ensemble_job(job: Job, name: str, weights: list[float] | str) -> None:
    """The job's outputs can be mixed (and, for ``posterior``, are next-token distributions)."""
    kind = outputs_of(job)
    if kind is None:
        raise UsageError(
            f"job {name!r} does not say its model outputs a distribution (the job's 'outputs' "
            "attribute), so its runs cannot be ensembled; --method average merges their weights"
        )
    if weights == POSTERIOR and kind != "next-token":
        raise UsageError(
            f"--weights posterior needs a next-token language model; job {name!r} outputs {kind}"
        )


@dataclass
class Ensemble:
    """An ensemble made ready to use: the first member's job, the mixture, and what it read."""

    name: str
    job: Job
    job_name: str
    model: Mixture
    members: list[dict[str, Any]]  # run, version read, weight (or "posterior")


def load_ensemble(store: Store, home: Path, name: str, record: Mapping[str, Any]) -> Ensemble:
    """Build the mixture of the ensemble's members at the versions they read now.

    Members are evaluated, and sampled from, with the first member's job (its eval set).
    """
    members = [Member(m["run"], m.get("version")) for m in record["members"]]
    weights = record["weights"]
    posterior = weights == POSTERIOR
    prior = [1.0 / len(members)] * len(members) if posterior else [float(w) for w in weights]
    first = store.run_config(members[0].run)
    job = load_job(first.job, first.job_args)
    models, used = [], []
    for member, weight in zip(members, prior, strict=True):
        config = store.run_config(member.run)
        version = resolve_version(store, member)
        member_job = job if member is members[0] else load_job(config.job, config.job_args)
        model = member_job.build_model()
        try:
            model.load_state_dict(version_weights(store, home, member.run, version))
        except RuntimeError as e:
            raise UsageError(f"version {version} of run {member.run!r} does not fit its job: {e}") from None
        models.append(model)
        used.append({"run": member.run, "version": version, "weight": POSTERIOR if posterior else weight})
    return Ensemble(name, job, first.job, Mixture(models, prior, posterior=posterior), used)
