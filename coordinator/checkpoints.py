"""Model versions on disk: safetensors files, settings and metrics per run.

Layout under ``CROWDTRAIN_HOME/runs/NAME/``::

    config.json              the run's settings, as ``init`` stored them
    model-v000003.safetensors  weights of version 3 (float32, state_dict names)
    strategy-v000003.safetensors  the strategy's state that produced it
    metrics.jsonl            one JSON line per finished round
    tokenizer.json           the job's tokenizer, for jobs that have one (``gpt``)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from serialization import TensorDict


def run_dir(home: Path, run: str) -> Path:
    return home / "runs" / run


def save_version(
    home: Path,
    run: str,
    version: int,
    weights: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, torch.Tensor] | None,
    config: Mapping[str, Any],
) -> Path:
    """Write one model version (and the strategy state beside it) atomically."""
    folder = run_dir(home, run)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"run": run, "version": str(version), "config": json.dumps(config, sort_keys=True)}
    path = folder / f"model-v{version:06d}.safetensors"
    _save_atomic(_contiguous(weights), path, meta)
    if strategy_state:
        _save_atomic(_contiguous(strategy_state), folder / f"strategy-v{version:06d}.safetensors", meta)
    config_path = folder / "config.json"
    if not config_path.exists():
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def save_text(home: Path, run: str, name: str, text: str) -> Path:
    """Write a file of the run (its tokenizer) atomically: a reader sees all of it or none."""
    folder = run_dir(home, run)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def load_version(home: Path, run: str, version: int) -> TensorDict:
    return load_file(run_dir(home, run) / f"model-v{version:06d}.safetensors")


def export_float32(weights: Mapping[str, torch.Tensor], out: Path, meta: Mapping[str, str]) -> None:
    """The export format: float32 safetensors with the model's state_dict names."""
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(_contiguous(tensors), out, dict(meta))


def append_metrics(home: Path, run: str, record: Mapping[str, Any]) -> None:
    folder = run_dir(home, run)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(home: Path, run: str) -> list[dict[str, Any]]:
    path = run_dir(home, run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> TensorDict:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _save_atomic(tensors: TensorDict, path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
