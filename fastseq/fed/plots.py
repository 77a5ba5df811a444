"""Curves: the evaluation metric and the cumulative bytes per round, for one or more runs."""

from __future__ import annotations

import os
from typing import Sequence


def _metric(histories) -> str:
    for _, hist in histories:
        if any(isinstance(h.get("accuracy"), (int, float)) for h in hist):
            return "accuracy"
    return "eval_loss"


def plot_runs(histories: Sequence[tuple[str, list[dict]]], path: str | os.PathLike) -> str:
    """``histories``: (label, metrics records). Writes a two-panel PNG and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(histories)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in histories:
        pts = [(h["round"], h[metric]) for h in hist if isinstance(h.get(metric), (int, float))]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
        total, cum = 0, []
        for h in hist:
            total += h.get("uplink_bytes", 0) + h.get("downlink_bytes", 0) + h.get("eval_downlink_bytes", 0)
            cum.append((h["round"], total / 1e6))
        if cum:
            ax2.plot(*zip(*cum), marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} per round")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative MB (uplink + downlink)")
    ax2.set_title("communication")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return str(path)
