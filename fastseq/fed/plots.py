"""Curves for one or more runs: the evaluation metric, the train/eval loss and the cumulative
bytes per round, with whole-number round ticks."""

from __future__ import annotations

import os
from typing import Sequence


def _metric(histories) -> str:
    for _, hist in histories:
        if any(isinstance(h.get("accuracy"), (int, float)) for h in hist):
            return "accuracy"
    return "eval_loss"


def _points(hist: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["round"], h[key]) for h in hist if isinstance(h.get(key), (int, float))]


def build_figure(histories: Sequence[tuple[str, list[dict]]]):
    """``histories``: (label, metrics records). A three-panel matplotlib figure: the metric,
    train loss (solid) and eval loss (dashed), and cumulative uplink + downlink MB per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = _metric(histories)
    fig, (ax_metric, ax_loss, ax_bytes) = plt.subplots(1, 3, figsize=(15, 4))
    for label, hist in histories:
        pts = _points(hist, metric)
        if pts:
            ax_metric.plot(*zip(*pts), marker="o", label=label)
        train, evl = _points(hist, "train_loss"), _points(hist, "eval_loss")
        line = None
        if train:
            (line,) = ax_loss.plot(*zip(*train), marker="o", label=f"{label} train")
        if evl:
            color = line.get_color() if line is not None else None
            ax_loss.plot(*zip(*evl), marker="s", linestyle="--", color=color, label=f"{label} eval")
        total, cum = 0, []
        for h in hist:
            total += h.get("uplink_bytes", 0) + h.get("downlink_bytes", 0) + h.get("eval_downlink_bytes", 0)
            cum.append((h["round"], total / 1e6))
        if cum:
            ax_bytes.plot(*zip(*cum), marker="o", label=label)
    ax_metric.set_ylabel(metric)
    ax_metric.set_title(f"{metric} per round")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("train loss (solid) and eval loss (dashed)")
    ax_bytes.set_ylabel("cumulative MB (uplink + downlink)")
    ax_bytes.set_title("communication")
    for ax in (ax_metric, ax_loss, ax_bytes):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


def plot_runs(histories: Sequence[tuple[str, list[dict]]], path: str | os.PathLike) -> str:
    """Write `build_figure(histories)` as a PNG to `path` and return the path."""
    fig = build_figure(histories)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return str(path)
