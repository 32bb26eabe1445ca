"""A shard paused half-way, on disk: what it takes to go on from the step it stopped at.

One safetensors file per shard under ``CROWDTRAIN_HOME/volunteer/NAME/shards/``:
the model's weights as trained so far, the inner optimizer's tensors, torch's
RNG state, and in the file's metadata (JSON, never pickle) the step, how many
batches were drawn (the data position: the shard's batches are replayed that
far from their seed), samples and losses so far, the optimizer's settings, and
which run, round, shard and base version it belongs to. Written when a pause
begins, deleted when the shard ends; a volunteer killed while paused finds it
when the shard comes back to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("crowdtrain.volunteer")

MAX_AGE = 24 * 3600.0  # a checkpoint no shard came back for in a day is of no use
FORMAT = "crowdtrain-shard-1"


@dataclass
class ShardState:
    """Where one shard's training stands between two steps."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # the optimizer's state_dict
    rng: torch.Tensor  # torch's CPU generator state after the last step
    done: int  # steps trained
    drawn: int  # batches drawn from the shard's iterator
    samples: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training time so far (the shard's time budget goes on from it)


@dataclass(frozen=True)
class ShardKey:
    run: str
    round: int
    shard: int
    version: int

    def filename(self) -> str:
        return f"{self.run}.{self.round}.{self.shard}.{self.version}.safetensors"


class Checkpoints:
    """The paused shards of one volunteer, one file each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, key: ShardKey, state: ShardState) -> Path:
        """Write ``state`` atomically (a half-written file is never read)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tensors = {f"w/{k}": _own(v) for k, v in state.weights.items()}
        tensors["rng"] = _own(state.rng)
        values: dict[str, dict[str, Any]] = {}
        for index, entry in state.optimizer.get("state", {}).items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"o/{index}/{name}"] = _own(value)
                else:
                    values.setdefault(str(index), {})[name] = value
        meta = {
            "format": FORMAT,
            "key": [key.run, key.round, key.shard, key.version],
            "done": state.done,
            "drawn": state.drawn,
            "samples": state.samples,
            "losses": state.losses,
            "seconds": state.seconds,
            "param_groups": state.optimizer.get("param_groups", []),
            "optimizer_values": values,
        }
        path = self.folder / key.filename()
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata={"crowdtrain": json.dumps(meta)})
        os.chmod(partial, 0o600)
        os.replace(partial, path)
        return path

    def load(self, key: ShardKey) -> ShardState | None:
        """The saved state of ``key``'s shard, or None (none, unreadable, or another shard's)."""
        path = self.folder / key.filename()
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("crowdtrain", "{}"))
            tensors = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as e:
            log.warning("ignoring the unreadable checkpoint %s: %s", path, e)
            return None
        if meta.get("format") != FORMAT or meta.get("key") != [key.run, key.round, key.shard, key.version]:
            return None
        state: dict[Any, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("o/"):
                _, index, entry = name.split("/", 2)
                state.setdefault(int(index), {})[entry] = value
        for index, entries in dict(meta.get("optimizer_values") or {}).items():
            state.setdefault(int(index), {}).update(entries)
        return ShardState(
            weights={k[2:]: v for k, v in tensors.items() if k.startswith("w/")},
            optimizer={"state": state, "param_groups": meta.get("param_groups") or []},
            rng=tensors["rng"],
            done=int(meta["done"]),
            drawn=int(meta["drawn"]),
            samples=int(meta["samples"]),
            losses=[float(x) for x in meta.get("losses") or []],
            seconds=float(meta.get("seconds") or 0.0),
        )

    def delete(self, key: ShardKey) -> None:
        try:
            (self.folder / key.filename()).unlink()
        except FileNotFoundError:
            pass

    def prune(self, now: float | None = None) -> int:
        """Delete checkpoints older than MAX_AGE; how many went."""
        now = time.time() if now is None else now
        gone = 0
        for path in self.folder.glob("*.safetensors") if self.folder.is_dir() else ():
            try:
                if now - path.stat().st_mtime > MAX_AGE:
                    path.unlink()
                    gone += 1
            except OSError:
                continue
        return gone


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares no storage (safetensors refuses tied tensors)."""
    return tensor.detach().to("cpu").clone().contiguous()
