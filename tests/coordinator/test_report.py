"""The report plot: a PNG of eval loss per round and per uplink byte."""

from __future__ import annotations

import struct

import pytest
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from coordinator.views.report import plot_run
from tests.conftest import png_pixels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _document(rounds: int = 5, uplink: float = 2.2e6, accuracy: bool = True, growth: float = 1.0) -> dict:
    records = []
    for n in range(1, rounds + 1):
        record = {
            "round": n,
            "model_version": n,
            "shards": 4,
            "accepted": 4,
            "rejected": 0,
            "late": 0,
            "train_loss": 3.0 / n,
            "eval_loss": 2.0 + 1.0 / n,
            "uplink_bytes": int(uplink * growth**n),
            "downlink_bytes": 1_100_000,
            "seconds": 4.2,
        }
        if accuracy:
            record["eval_accuracy"] = 0.1 + 0.05 * n
        records.append(record)
    return {
        "run": "demo",
        "job": "charlm",
        "strategy": "fedavg",
        "compression": "int8",
        "rounds": records,
        "initial": {"model_version": 0, "eval_loss": 5.5, "eval_accuracy": 0.01},
        "final": {"model_version": rounds, "eval_loss": records[-1]["eval_loss"] if records else 5.5},
    }


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """The figures ``plot_run`` drew, kept as it closes them: what the PNG shows, as data."""
    figures: list[Figure] = []
    close = plt.close

    def keep(figure: Figure) -> None:
        figures.append(figure)
        close(figure)

    monkeypatch.setattr(plt, "close", keep)
    return figures


def _curve(axes, label: str = "eval loss (lower is better)") -> tuple[list[float], list[float]]:
    (line,) = [line for line in axes.get_lines() if line.get_label() == label]
    return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # loss and accuracy, linear uplink
        dict(accuracy=False),  # a job without an accuracy metric
        dict(growth=10.0),  # uplink spanning decades: log axis
        dict(rounds=0),  # nothing merged yet: only the initial model
    ],
)
def test_plot_run_writes_a_wide_png_with_content(tmp_path, case, drawn):
    # arrange
    out = tmp_path / "nested" / "report.png"
    # act
    written = plot_run(_document(**case), out)
    # assert
    data = written.read_bytes()
    assert written == out
    width, height = _png_size(data)
    assert width > 1000 and 400 < height < width
    assert len(data) > 20_000  # two panels of curves, labels and a title, not a blank canvas
    pixels = png_pixels(written)  # it decodes, to the size its header claims, and is not blank
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05
    (figure,) = drawn
    by_round, by_bytes = figure.axes[:2]
    assert by_round.get_title() == "eval loss per merged round"
    assert by_round.get_ylabel() == by_bytes.get_ylabel() == "eval loss"
    assert by_bytes.get_xlabel().startswith("cumulative bytes uploaded by volunteers")
    assert (by_bytes.get_xscale() == "log") == (case.get("growth", 1.0) > 1.0)
    rounds = case.get("rounds", 5)
    assert _curve(by_round)[0] == list(range(rounds + 1))  # the initial model, then each version
    accuracy = [a for a in figure.axes if a.get_ylabel() == "eval accuracy"]
    assert len(accuracy) == (1 if case.get("accuracy", True) and rounds else 0)


def test_plot_run_skips_rounds_that_failed_but_counts_their_uplink(tmp_path, drawn):
    # arrange: round 2 failed (no eval) yet its volunteers uploaded bytes
    document = _document(rounds=3)
    document["rounds"][1].update(eval_loss=None, eval_accuracy=None, model_version=1)
    # act
    out = plot_run(document, tmp_path / "report.png")
    # assert: no point for the failed round; its bytes are in the uplink of the rounds after it
    assert out.stat().st_size > 20_000
    assert png_pixels(out).shape[:2] == _png_size(out.read_bytes())[::-1]
    (figure,) = drawn
    by_round, by_bytes = figure.axes[:2]
    losses = [5.5, 3.0, 2.0 + 1.0 / 3]
    assert _curve(by_round) == ([0, 1, 3], pytest.approx(losses))
    assert _curve(by_bytes) == ([0, 2.2e6, 6.6e6], pytest.approx(losses))
    assert "final eval loss 2.333 at version 3, 6.6 MB uploaded" in figure.get_suptitle()
