"""Round progress for people: a rich bar on a terminal, plain lines elsewhere.

With ``--json`` (``quiet``) nothing is written: stdout holds only the document.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

Clock = Callable[[], float]


class RoundProgress:
    """Shows one round's accepted/total shards, elapsed time and ETA while it is waited for."""

    def __init__(
        self,
        run: str,
        number: int,
        shards: int,
        quiet: bool = False,
        stream: TextIO | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.fancy = not quiet and self.stream.isatty()
        self.label = f"{run} round {number}"
        self.shards = shards
        self._clock = clock
        self._last: tuple[Any, ...] | None = None
        self._started = clock()
        if self.fancy:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("accepted"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(file=self.stream, force_terminal=True),
                transient=False,
                get_time=clock,
            )
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
        if self.quiet:
            return
        elapsed = self._clock() - self._started
        accepted = int(info.get("accepted") or 0)
        detail = _detail(info, accepted, elapsed, int(info.get("quorum") or self.shards))
        changed, self._last = state != self._last, state
        if self.fancy:
            # Update on every poll (the ETA moves on its own); draw at once when counters change.
            self._bar.update(self._task, completed=accepted, detail=detail, refresh=changed)
            return
        if not changed:
            return
        print(
            f"{self.label}: {accepted}/{self.shards} accepted, {elapsed:.1f}s elapsed, {detail}",
            file=self.stream,
            flush=True,
        )


def rounds_table(document: dict[str, Any]) -> Table:
    """The per-round table printed after ``run`` and ``quickstart`` (fits 80 columns)."""
    table = Table(
        title=f"run {document['run']} ({document['job']}, {document['strategy']}, "
        f"compression {document['compression']})",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0, 0, 1),
    )
    for column in (
        "round",
        "version",
        "accepted",
        "rejected",
        "late",
        "train\nloss",
        "eval\nloss",
        "uplink",
        "downlink",
        "secs",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    initial = document.get("initial", {})
    table.add_row("-", "0", "", "", "", "", _num(initial.get("eval_loss")), "", "", "")
    for r in document["rounds"]:
        table.add_row(
            str(r["round"]),
            str(r["model_version"]),
            f"{r['accepted']}/{r['shards']}",
            str(r["rejected"]),
            str(r["late"]),
            _num(r["train_loss"]),
            _num(r["eval_loss"]),
            _bytes(r["uplink_bytes"]),
            _bytes(r["downlink_bytes"]),
            _num(r["seconds"], 1),
        )
    return table


def _detail(info: dict[str, Any], accepted: int, elapsed: float, quorum: int) -> str:
    """Rejected/late counts, the round's status and the time left until its quorum."""
    parts = []
    if info.get("rejected"):
        parts.append(f"{info['rejected']} rejected")
    if info.get("late"):
        parts.append(f"{info['late']} late")
    status = info.get("status")
    if status == "open":
        parts.append(f"ETA {_eta(accepted, quorum, elapsed)}")
    elif status:
        parts.append(str(status))
    return ", ".join(parts)


def _eta(accepted: int, quorum: int, elapsed: float) -> str:
    """Time to quorum at the pace so far; '?' before the first accepted shard."""
    if accepted <= 0:
        return "?"
    left = max(0.0, elapsed / accepted * (quorum - accepted))
    return f"{left:.0f}s" if left < 120 else f"{left / 60:.0f}m"


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _bytes(count: Any) -> str:
    count = float(count or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
