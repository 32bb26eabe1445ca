"""Round progress: a rich bar on a terminal, plain lines in a pipe, silence with --json."""

from __future__ import annotations

import io

from rich.console import Console

from coordinator.views.progress import RoundProgress, rounds_table


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, as sys.stdout does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def _round(accepted: int, status: str = "open", rejected: int = 0) -> dict:
    return {"status": status, "accepted": accepted, "rejected": rejected, "late": 0, "shards": 4, "quorum": 4}


def _watch(stream, quiet: bool = False) -> None:
    clock = FakeClock()
    with RoundProgress("demo", 3, 4, quiet=quiet, stream=stream, clock=clock) as progress:
        progress.update(_round(0))
        progress.update(_round(0))  # unchanged counters: no new line
        clock.now += 10
        progress.update(_round(1))
        clock.now += 10
        progress.update(_round(2, rejected=1))
        clock.now += 20
        progress.update(_round(4, status="done", rejected=1))


def test_a_pipe_gets_one_plain_line_per_change_with_elapsed_and_eta():
    # arrange
    stream = io.StringIO()
    # act
    _watch(stream)
    # assert
    lines = stream.getvalue().splitlines()
    assert lines == [
        "demo round 3: 0/4 accepted, 0.0s elapsed, ETA ?",
        "demo round 3: 1/4 accepted, 10.0s elapsed, ETA 30s",
        "demo round 3: 2/4 accepted, 20.0s elapsed, 1 rejected, ETA 20s",
        "demo round 3: 4/4 accepted, 40.0s elapsed, 1 rejected, done",
    ]
    assert "\x1b[" not in stream.getvalue()  # no terminal escape codes in logs


def test_a_terminal_gets_a_rich_bar_with_counts_and_eta():
    # arrange
    stream = FakeTerminal()
    # act
    _watch(stream)
    # assert
    out = stream.getvalue()
    assert "\x1b[" in out  # drawn with escape codes, redrawn in place
    assert "demo round 3" in out and "4/4" in out and "done" in out
    assert "ETA" in out and "rejected" in out
    assert "━" in out  # the bar itself
    assert "demo round 3: 0/4 accepted" not in out  # not the plain-line format


def test_json_mode_writes_nothing_even_on_a_terminal():
    for stream in (io.StringIO(), FakeTerminal()):
        _watch(stream, quiet=True)
        assert stream.getvalue() == ""


def test_eta_counts_to_the_quorum_not_to_all_shards():
    stream = io.StringIO()
    clock = FakeClock()
    progress = RoundProgress("demo", 1, 8, stream=stream, clock=clock)
    clock.now += 30
    progress.update({"status": "open", "accepted": 3, "rejected": 0, "late": 0, "quorum": 6})
    assert stream.getvalue().strip().endswith("ETA 30s")


def test_rounds_table_fits_80_columns_with_every_number():
    # arrange
    document = {
        "run": "quickstart",
        "job": "charlm",
        "strategy": "fedavg",
        "compression": "none",
        "initial": {"eval_loss": 5.5612},
        "rounds": [
            {
                "round": n,
                "model_version": n,
                "shards": 4,
                "accepted": 4,
                "rejected": 0,
                "late": 0,
                "train_loss": 3.6213,
                "eval_loss": 2.7751,
                "uplink_bytes": 2_200_000,
                "downlink_bytes": 1_100_000,
                "seconds": 16.24,
            }
            for n in (1, 2)
        ],
    }
    stream = io.StringIO()
    # act
    Console(file=stream, width=80).print(rounds_table(document))
    # assert
    out = stream.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out  # nothing truncated
    for text in ("5.561", "3.621", "2.775", "2.2 MB", "1.1 MB", "16.2", "4/4"):
        assert text in out, text
