"""The append-only parts of a run's record on disk: credit and reputation, and its rounds.

Redis holds the live totals; these JSON-lines files under
``CROWDTRAIN_HOME/runs/NAME/`` hold every change that made them, written by
the trusted side as it happens (one write and an fsync per batch), so
``coordinator restore`` can rebuild them after Redis lost its data:

- ``ledger.jsonl``: ``{"at", "kind": "credit", "volunteer", "counts", ...}``
  for each credit given (merged shards, samples, training seconds; a
  rejection), ``{"at", "kind": "reputation", "values": {NAME: R}}`` for each
  reputation set while judging the run's rounds.
- ``rounds.jsonl``: ``{"at", "round", "status": "open", "shards", "quorum",
  "deadline_seconds", "base_version"}`` when a round is posted, and the
  round's ``--json`` record (``status`` done or failed) when it ends.

A line cut short by a crash is skipped when read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.runs.checkpoints import append_lines, read_lines, run_dir

log = logging.getLogger("crowdtrain.ledger")

LEDGER = "ledger.jsonl"
ROUNDS = "rounds.jsonl"
ENDED = ("done", "failed")
# What a volunteer's record in Redis adds up (``Store.credit``).
COUNTS = ("shards_done", "samples", "accepted", "rejected")


@dataclass
class Credit:
    """One volunteer's record as a run's ledger adds it up."""

    counts: dict[str, int] = field(default_factory=dict)
    train_seconds: float = 0.0
    device: str | None = None
    memory_gb: int | None = None
    reputation: float | None = None
    reputation_at: float = 0.0


class Ledger:
    """Where the trusted side writes credit and reputation of a run as it gives them."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def credit(
        self,
        run: str,
        volunteer: str,
        counts: Mapping[str, int],
        seconds: float = 0.0,
        device: str | None = None,
        memory_gb: int | None = None,
    ) -> None:
        entry: dict[str, Any] = {"at": time.time(), "kind": "credit", "volunteer": volunteer}
        entry["counts"] = {k: int(v) for k, v in counts.items() if v}
        if seconds:
            entry["seconds"] = float(seconds)
        if device:
            entry["device"] = device
        if memory_gb:
            entry["memory_gb"] = int(memory_gb)
        self._append(run, entry)

    def reputations(self, run: str, values: Mapping[str, float]) -> None:
        if values:
            self._append(run, {"at": time.time(), "kind": "reputation", "values": dict(values)})

    def forfeit(self, run: str, volunteer: str) -> None:
        """A failed work check: the volunteer's accepted shards and samples, in every run, and
        its reputation go back to 0 (``coordinator.merging.work.forfeit``), on disk as in Redis."""
        self._append(run, {"at": time.time(), "kind": "forfeit", "volunteer": volunteer})

    def _append(self, run: str, entry: dict[str, Any]) -> None:
        """A disk that refuses is logged: the credit is given in Redis already, and rounds go on."""
        try:
            append_lines(run_dir(self.home, run) / LEDGER, [entry])
        except OSError as e:
            log.error("could not write to the ledger of run %s (%s): %s", run, e, json.dumps(entry))


def credit_of(home: Path, runs: Iterable[str], forfeits_from: Iterable[str] = ()) -> dict[str, Credit]:
    """Each volunteer's credit summed over the ledgers of ``runs``, and its latest reputation.

    Entries are folded in time order across runs, so a forfeit (a failed work check) clears
    what came before it in every run, and only that; ``forfeits_from`` adds the forfeits
    written in other runs' ledgers.
    """
    entries = [entry for run in runs for entry in read_lines(run_dir(home, run) / LEDGER)]
    entries += [
        entry
        for run in forfeits_from
        for entry in read_lines(run_dir(home, run) / LEDGER)
        if entry.get("kind") == "forfeit"
    ]
    entries.sort(key=lambda entry: float(entry.get("at") or 0.0))
    out: dict[str, Credit] = {}
    for entry in entries:
        if entry.get("kind") == "credit" and isinstance(entry.get("volunteer"), str):
            record = out.setdefault(entry["volunteer"], Credit())
            for name, count in (entry.get("counts") or {}).items():
                if name in COUNTS and isinstance(count, int):
                    record.counts[name] = record.counts.get(name, 0) + count
            record.train_seconds += float(entry.get("seconds") or 0.0)
            record.device = entry.get("device") or record.device
            record.memory_gb = entry.get("memory_gb") or record.memory_gb
        elif entry.get("kind") == "forfeit" and isinstance(entry.get("volunteer"), str):
            record = out.setdefault(entry["volunteer"], Credit())
            record.counts.update(accepted=0, samples=0)
            record.reputation, record.reputation_at = 0.0, float(entry.get("at") or 0.0)
        elif entry.get("kind") == "reputation":
            at = float(entry.get("at") or 0.0)
            for name, value in (entry.get("values") or {}).items():
                record = out.setdefault(name, Credit())
                if at >= record.reputation_at:
                    record.reputation, record.reputation_at = float(value), at
    return out


def round_opened(home: Path, run: str, info: Mapping[str, Any]) -> None:
    """Note a posted round (``coordinator post-round``, ``run``, ``restore``)."""
    keep = ("round", "shards", "quorum", "deadline_seconds", "base_version")
    entry = {"at": time.time(), "status": "open", **{k: info[k] for k in keep if k in info}}
    append_lines(run_dir(home, run) / ROUNDS, [entry])


def round_ended(home: Path, run: str, record: Mapping[str, Any]) -> None:
    """Note a round's end: its ``--json`` record, status done or failed."""
    append_lines(run_dir(home, run) / ROUNDS, [{"at": time.time(), **record}])


def rounds_of(home: Path, run: str) -> dict[int, dict[str, Any]]:
    """Each round's latest record on disk, by number (an ended round's end record wins)."""
    out: dict[int, dict[str, Any]] = {}
    for entry in read_lines(run_dir(home, run) / ROUNDS):
        number = entry.get("round")
        if not isinstance(number, int):
            continue
        if entry.get("status") in ENDED or out.get(number, {}).get("status") not in ENDED:
            out[number] = entry
    return out
