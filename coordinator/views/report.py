"""``coordinator report``: eval loss (and accuracy) per round and per uplink byte, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter, MaxNLocator

LOSS_COLOR = "tab:blue"
ACCURACY_COLOR = "tab:green"
# Uplink spanning more than this ratio (first to last merged round) is drawn on a log axis.
LOG_SPAN = 30.0


def plot_run(document: dict[str, Any], out: Path) -> Path:
    """Draw the run's learning curve against rounds and against cumulative uplink bytes."""
    initial = document.get("initial") or {}
    points = _points(document)
    private = any(p.get("epsilon") is not None for p in points)
    columns = 3 if private else 2
    fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4.4), constrained_layout=True)
    by_round, by_bytes = axes[0], axes[1]
    if private:
        _epsilon(
            axes[2], [0] + [p["model_version"] for p in points], [0.0] + [p.get("epsilon") for p in points]
        )
    title = (
        f"run {document['run']}: job {document['job']}, strategy {document['strategy']}, "
        f"compression {document['compression']}"
    )
    if points:
        last = points[-1]
        title += (
            f"\nfinal eval loss {last['eval_loss']:.3f} at version {last['model_version']}, "
            f"{_engineering(last['cumulative_uplink'])} uploaded"
        )
    fig.suptitle(title)

    versions = [0] + [p["model_version"] for p in points]
    losses = [initial.get("eval_loss")] + [p["eval_loss"] for p in points]
    lines = _loss(by_round, versions, losses)
    by_round.set_title("eval loss per merged round")
    by_round.set_xlabel("model version (rounds merged)")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(p.get("eval_accuracy") is not None for p in points):
        accuracy = [initial.get("eval_accuracy")] + [p.get("eval_accuracy") for p in points]
        lines += _accuracy(by_round.twinx(), versions, accuracy)
    fig.legend(
        lines,
        [line.get_label() for line in lines],
        loc="outside lower center",
        ncol=len(lines),
        frameon=False,
    )

    uplink = [p["cumulative_uplink"] for p in points]
    log_x = len(uplink) > 1 and uplink[0] > 0 and uplink[-1] / uplink[0] > LOG_SPAN
    if log_x:  # the initial model (0 bytes) has no place on a log axis
        _loss(by_bytes, uplink, losses[1:])
        by_bytes.set_xscale("log")
    else:
        _loss(by_bytes, [0.0, *uplink], losses)
    by_bytes.xaxis.set_major_formatter(EngFormatter(unit="B"))
    by_bytes.set_xlabel("cumulative bytes uploaded by volunteers" + (" (log scale)" if log_x else ""))
    by_bytes.set_title("eval loss per uplink byte")
    if not points:
        by_round.set_xlim(-0.5, 1.5)
        by_bytes.set_xlim(-0.1e6, 1e6)
        by_bytes.text(
            0.5, 0.3, "no merged rounds yet", transform=by_bytes.transAxes, ha="center", color="gray"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _epsilon(ax: Any, versions: list[int], epsilons: list[float | None]) -> None:
    """Privacy spent: cumulative epsilon of DP-FedAvg after each merged round."""
    ax.plot(versions, epsilons, marker="s", color="tab:purple", label="epsilon")
    ax.set_title("privacy spent (epsilon, DP-FedAvg)")
    ax.set_xlabel("model version (rounds merged)")
    ax.set_ylabel("epsilon")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _points(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluated rounds with the uplink bytes of all rounds so far (failed ones included)."""
    points, total = [], 0.0
    for r in document["rounds"]:
        total += float(r.get("uplink_bytes") or 0)
        if r.get("eval_loss") is not None:
            points.append({**r, "cumulative_uplink": total})
    return points


def _engineering(count: float) -> str:
    return EngFormatter(unit="B", places=1)(count)


def _loss(ax: Any, xs: list[float], losses: list[float | None]) -> list[Any]:
    pairs = [(x, y) for x, y in zip(xs, losses) if y is not None]
    lines = ax.plot(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        marker="o",
        color=LOSS_COLOR,
        label="eval loss (lower is better)",
    )
    ax.set_ylabel("eval loss", color=LOSS_COLOR)
    ax.tick_params(axis="y", labelcolor=LOSS_COLOR)
    ax.grid(True, alpha=0.3)
    return lines


def _accuracy(ax: Any, xs: list[float], accuracy: list[float | None]) -> list[Any]:
    pairs = [(x, y) for x, y in zip(xs, accuracy) if y is not None]
    lines = ax.plot(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        marker="s",
        linestyle="--",
        color=ACCURACY_COLOR,
        label="eval accuracy (higher is better)",
    )
    ax.set_ylabel("eval accuracy", color=ACCURACY_COLOR)
    ax.tick_params(axis="y", labelcolor=ACCURACY_COLOR)
    return lines
