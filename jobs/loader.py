"""The built-in registry, and loading a job by name or import path.

A job is what a run trains: model, data shards, loss and evaluation. Built-ins are
named in ``BUILTIN_JOBS``; a user's own job is an import path ``package.module:factory``
whose factory takes the ``--job-arg`` keyword arguments. Volunteers pass ``allowed``
so that a job off their allow-list is refused before any of its code is imported.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from jobs.interface import REQUIRED_METHODS, Job, JobError

BUILTIN_JOBS: dict[str, str] = {"charlm": "jobs.charlm:make_job", "gpt": "jobs.gpt:make_job"}

_PATH_HINT = "package.module:factory"


def parse_job_args(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn repeated ``--job-arg key=value`` strings into factory keyword arguments."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise JobError(f"malformed --job-arg {pair!r}: expected key=value, e.g. layers=4")
        if not key.isidentifier():
            raise JobError(
                f"malformed --job-arg {pair!r}: expected key=value with an identifier as key, e.g. layers=4"
            )
        try:
            args[key] = json.loads(raw)
        except ValueError:
            args[key] = raw  # not JSON: keep the text, e.g. corpus=/data/*.txt
    return args


def load_job(
    name: str,
    job_args: Mapping[str, Any] | None = None,
    allowed: Collection[str] | None = None,
) -> Job:
    """Build job ``name`` (built-in or ``package.module:factory``); refuse it if off ``allowed``."""
    if allowed is not None and name not in allowed:
        # Checked before any import: an untrusted job's module must never run here.
        listed = ", ".join(sorted(allowed)) or "(none)"
        raise JobError(f"job {name!r} is not on this volunteer's allow-list (--allow-job); allowed: {listed}")
    factory = _resolve_factory(name)
    try:
        job = factory(**dict(job_args or {}))
    except JobError:
        raise
    except (TypeError, ValueError) as e:
        raise JobError(f"job {name!r} rejected its arguments: {e}; check the --job-arg values") from e
    _check_job(name, job)
    return job


def _resolve_factory(name: str) -> Any:
    """Import the module of ``name`` and return its factory, translating failures to JobError."""
    path = BUILTIN_JOBS.get(name)
    if path is None:
        if ":" not in name:
            builtins = ", ".join(sorted(BUILTIN_JOBS))
            raise JobError(
                f"unknown job {name!r}: use a built-in ({builtins}) or an import path {_PATH_HINT}"
            )
        path = name
    module_name, _, attr = path.partition(":")
    if not _is_dotted(module_name) or not _is_dotted(attr):
        raise JobError(f"malformed job path {name!r}: expected {_PATH_HINT}, e.g. mypkg.jobs:make_job")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JobError(
            f"cannot import job module {module_name!r} ({e}): check the name and that it is "
            "installed or on PYTHONPATH"
        ) from e
    except Exception as e:  # user code failing at import time
        raise JobError(f"job module {module_name!r} failed to import: {type(e).__name__}: {e}") from e
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise JobError(f"job module {module_name!r} has no factory {attr!r}: check the name after ':'")
        factory = getattr(factory, part)
    if not callable(factory):
        raise JobError(f"job factory {path!r} is not callable: point at a function or class")
    return factory


def _check_job(name: str, job: Any) -> None:
    """Refuse a factory result that does not provide the job interface."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(job, m, None))]
    if not isinstance(getattr(job, "name", None), str):
        missing.insert(0, "name")
    if missing:
        raise JobError(
            f"job {name!r} returned {type(job).__name__}, which lacks {', '.join(missing)}: "
            "a job needs name, build_model, shard, loss and evaluate"
        )


def _is_dotted(text: str) -> bool:
    """True for ``a.b.c`` made of Python identifiers."""
    return bool(text) and all(part.isidentifier() for part in text.split("."))
