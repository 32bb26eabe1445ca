"""The report plot: a PNG of eval loss per round and per uplink byte."""

from __future__ import annotations

import struct

import pytest

from coordinator.report import plot_run

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


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # loss and accuracy, linear uplink
        dict(accuracy=False),  # a job without an accuracy metric
        dict(growth=10.0),  # uplink spanning decades: log axis
        dict(rounds=0),  # nothing merged yet: only the initial model
    ],
)
def test_plot_run_writes_a_wide_png_with_content(tmp_path, case):
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


def test_plot_run_skips_rounds_that_failed_but_counts_their_uplink(tmp_path):
    # arrange: round 2 failed (no eval) yet its volunteers uploaded bytes
    document = _document(rounds=3)
    document["rounds"][1].update(eval_loss=None, eval_accuracy=None, model_version=1)
    # act
    out = plot_run(document, tmp_path / "report.png")
    # assert
    assert out.stat().st_size > 20_000
