"""Round progress for people: a rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RoundProgress:
    """Shows one round's accepted/total shards while ``wait_round`` polls it."""

    def __init__(self, run: str, number: int, shards: int, quiet: bool = False,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.fancy = not quiet and self.stream.isatty()
        self.label = f"{run} round {number}"
        self.shards = shards
        self._last: tuple[Any, ...] | None = None
        self._started = time.monotonic()
        if self.fancy:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                                 TimeElapsedColumn(), console=Console(file=self.stream),
                                 transient=False)
            self._task = self._bar.add_task(self.label, total=shards, detail="")

    def __enter__(self) -> RoundProgress:
        if self.fancy:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fancy:
            self._bar.stop()

    def update(self, info: dict[str, Any]) -> None:
        """Redraw (or print a line) when the round's counters change."""
        state = (info.get("status"), info.get("accepted"), info.get("rejected"), info.get("late"))
        if state == self._last or self.quiet:
            return
        self._last = state
        detail = f"rejected {info.get('rejected', 0)}  {info.get('status')}"
        if self.fancy:
            self._bar.update(self._task, completed=int(info.get("accepted", 0)), detail=detail)
        else:
            elapsed = time.monotonic() - self._started
            print(f"{self.label}: {info.get('accepted', 0)}/{self.shards} accepted, {detail}, "
                  f"{elapsed:.1f}s", file=self.stream, flush=True)


def rounds_table(document: dict[str, Any]) -> Table:
    """The per-round table printed after ``run`` and ``quickstart``."""
    table = Table(title=f"run {document['run']} ({document['job']}, {document['strategy']}, "
                        f"{document['compression']})")
    for column in ("round", "version", "accepted", "rejected", "late", "train loss",
                   "eval loss", "uplink", "downlink", "seconds"):
        table.add_column(column, justify="right")
    initial = document.get("initial", {})
    table.add_row("-", "0", "", "", "", "", _num(initial.get("eval_loss")), "", "", "")
    for r in document["rounds"]:
        table.add_row(str(r["round"]), str(r["model_version"]), f"{r['accepted']}/{r['shards']}",
                      str(r["rejected"]), str(r["late"]), _num(r["train_loss"]),
                      _num(r["eval_loss"]), _bytes(r["uplink_bytes"]), _bytes(r["downlink_bytes"]),
                      _num(r["seconds"], 1))
    return table


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _bytes(count: Any) -> str:
    count = float(count or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
