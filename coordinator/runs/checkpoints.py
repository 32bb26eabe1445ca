"""Model versions on disk: safetensors files, settings and metrics per run.

The disk is a complete record of a run (``coordinator restore`` rebuilds Redis
from it). Layout under ``CROWDTRAIN_HOME/runs/NAME/``::

    config.json              the run's settings, as ``init`` stored them
    model-v000003.safetensors  weights of version 3 (state_dict names), written last of a version
    strategy-v000003.safetensors  the strategy's state after version 3 (strategies that keep one)
    downlink-v000003.safetensors  the downlink residual after version 3 (lossy --downlink-compression)
    state-v000003.json       the rest of the trusted side's state after version 3 (voice norms, DP clip)
    metrics.jsonl            one JSON line per merged round
    rounds.jsonl             round records: opened, ended (``coordinator.runs.ledger``)
    ledger.jsonl             credit and reputation, append-only (``coordinator.runs.ledger``)
    tokenizer.json           the job's tokenizer, for jobs that have one (``gpt``)

A file that is replaced is written to a temporary name, fsynced and renamed;
the model file of a version is written after the others of that version, so a
version whose model file exists is whole.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from broker.run_config import RunConfig
from serialization import TensorDict

_MODEL = re.compile(r"^model-v(\d{6,})\.safetensors$")


def run_dir(home: Path, run: str) -> Path:
    return home / "runs" / run


def save_version(
    home: Path,
    run: str,
    version: int,
    weights: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, torch.Tensor] | None,
    config: RunConfig,
    residual: Mapping[str, torch.Tensor] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write one model version and the state after it, each file atomically, the model last."""
    folder = run_dir(home, run)
    folder.mkdir(parents=True, exist_ok=True)
    stored = config.stored()
    meta = {"run": run, "version": str(version), "config": json.dumps(stored, sort_keys=True)}
    config_path = folder / "config.json"
    if not config_path.exists():
        _write_atomic(config_path, json.dumps(stored, indent=2, sort_keys=True).encode())
    if strategy_state:
        _save_atomic(_contiguous(strategy_state), folder / f"strategy-v{version:06d}.safetensors", meta)
    if residual:
        _save_atomic(_contiguous(residual), folder / f"downlink-v{version:06d}.safetensors", meta)
    if state is not None:
        _write_atomic(folder / f"state-v{version:06d}.json", json.dumps(state, sort_keys=True).encode())
    path = folder / f"model-v{version:06d}.safetensors"
    _save_atomic(_contiguous(weights), path, meta)
    return path


def move_aside(home: Path, run: str) -> Path:
    """Rename a run's folder to ``NAME.moved-UTCSTAMP`` (``init --force``): nothing is deleted."""
    folder = run_dir(home, run)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{run}.moved-{stamp}")
    n = 2
    while target.exists():
        target = folder.with_name(f"{run}.moved-{stamp}-{n}")
        n += 1
    folder.rename(target)
    return target


def save_text(home: Path, run: str, name: str, text: str) -> Path:
    """Write a file of the run (its tokenizer) atomically: a reader sees all of it or none."""
    folder = run_dir(home, run)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    _write_atomic(path, text.encode("utf-8"))
    return path


def load_version(home: Path, run: str, version: int) -> TensorDict:
    """A version's weights, in the order they were saved in."""
    return _load_ordered(run_dir(home, run) / f"model-v{version:06d}.safetensors")


def load_extra(home: Path, run: str, kind: str, version: int) -> TensorDict | None:
    """The ``strategy`` or ``downlink`` state saved after a version; None if it has none."""
    path = run_dir(home, run) / f"{kind}-v{version:06d}.safetensors"
    return _load_ordered(path) if path.exists() else None


def load_state(home: Path, run: str, version: int) -> dict[str, Any]:
    """The small state saved after a version (voice norms, DP clip); empty if it has none."""
    path = run_dir(home, run) / f"state-v{version:06d}.json"
    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return state


def read_config(home: Path, run: str) -> RunConfig:
    """The run's settings as ``init`` stored them."""
    return RunConfig.from_stored(json.loads((run_dir(home, run) / "config.json").read_text()))


def has_version(home: Path, run: str, version: int) -> bool:
    return (run_dir(home, run) / f"model-v{version:06d}.safetensors").exists()


def versions(home: Path, run: str) -> list[int]:
    """The versions whose model file is on disk, in order."""
    folder = run_dir(home, run)
    if not folder.is_dir():
        return []
    found = (_MODEL.match(path.name) for path in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def recorded_name(folder: Path) -> str | None:
    """The run name version 0 of a run folder was saved under (a folder moved aside keeps the old one)."""
    path = folder / f"model-v{0:06d}.safetensors"
    try:
        return _metadata(path).get("run")
    except Exception:  # no model file, or not one we wrote: not a run folder
        return None


def export_float32(weights: Mapping[str, torch.Tensor], out: Path, meta: Mapping[str, str]) -> None:
    """The export format: float32 safetensors with the model's state_dict names."""
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(_contiguous(tensors), out, dict(meta), keep_order=False)


def append_metrics(home: Path, run: str, record: Mapping[str, Any]) -> None:
    append_lines(run_dir(home, run) / "metrics.jsonl", [record])


def read_metrics(home: Path, run: str) -> list[dict[str, Any]]:
    return read_lines(run_dir(home, run) / "metrics.jsonl")


def append_lines(path: Path, records: list[Mapping[str, Any]]) -> None:
    """Append JSON lines in one write and fsync them: an append-only record survives a crash."""
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file; a line cut short by a crash (the last) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> TensorDict:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _load_ordered(path: Path) -> TensorDict:
    """A safetensors file's tensors in the order they were saved in (the same wire bytes again)."""
    tensors = load_file(path)
    names = _metadata(path).get("names")
    order = json.loads(names) if names else []
    if sorted(order) != sorted(tensors):
        return tensors
    return {name: tensors[name] for name in order}


def _save_atomic(tensors: TensorDict, path: Path, meta: dict[str, str], keep_order: bool = True) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if keep_order:  # safetensors does not keep the tensors' order: a blob rebuilt from the file is the same
        meta = {**meta, "names": json.dumps(list(tensors))}
    save_file(tensors, str(tmp), metadata=meta)
    _fsync(tmp)
    tmp.replace(path)
    _fsync(path.parent)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a reader (or a crash) sees all of it or none."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
