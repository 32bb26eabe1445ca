"""``coordinator report``: eval loss per round and per uplink byte, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt


def plot_run(document: dict[str, Any], out: Path) -> Path:
    """Draw the run's learning curve against rounds and against cumulative uplink bytes."""
    rounds = [r for r in document["rounds"] if r.get("eval_loss") is not None]
    initial = document.get("initial", {}).get("eval_loss")
    xs = [0] + [r["model_version"] for r in rounds]
    losses = [initial] + [r["eval_loss"] for r in rounds]
    uplink, total = [0.0], 0.0
    for r in rounds:
        total += float(r.get("uplink_bytes") or 0)
        uplink.append(total / 1e6)
    has_accuracy = any("eval_accuracy" in r for r in rounds)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    title = (f"{document['run']}: {document['job']}, {document['strategy']}, "
             f"compression {document['compression']}")
    fig.suptitle(title)
    _draw(axes[0], xs, losses, "model version (rounds merged)")
    _draw(axes[1], uplink, losses, "cumulative uplink (MB)")
    if has_accuracy:
        initial_acc = document.get("initial", {}).get("eval_accuracy")
        accuracy = [initial_acc] + [r.get("eval_accuracy") for r in rounds]
        twin = axes[0].twinx()
        twin.plot(xs, accuracy, color="tab:green", marker="s", linestyle="--", label="eval accuracy")
        twin.set_ylabel("eval accuracy", color="tab:green")
        twin.tick_params(axis="y", labelcolor="tab:green")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw(ax: Any, xs: list[float], losses: list[float | None], xlabel: str) -> None:
    points = [(x, y) for x, y in zip(xs, losses) if y is not None]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:blue")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval loss", color="tab:blue")
    ax.grid(True, alpha=0.3)
