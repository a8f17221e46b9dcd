"""``pareto.png``: every measured trial against each cost, its front, the teacher marked."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from effray.search.results import COSTS


def plot_pareto(
    table: pd.DataFrame,
    path: str | os.PathLike,
    teacher: dict[str, Any] | None = None,
    stopped: pd.DataFrame | None = None,
) -> None:
    """All trials per cost axis (log scale), the front as a step line, the teacher marked;
    trials stopped early at their rung's accuracy and predicted cost (x)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = [c for c in COSTS if c in table]
    robust = "pareto_robust_bytes" in table and table["corruption_accuracy"].notna().any()
    fig, axes = plt.subplots(1, len(costs) + robust, figsize=(5 * (len(costs) + robust), 4), squeeze=False)
    if robust:  # the second front: what survives corruption, against size
        _robust_panel(axes[0][-1], table, teacher)
    for ax, cost in zip(axes[0], costs):
        front = table[table[f"pareto_{cost}"]].sort_values(cost)
        ax.scatter(table[cost], table["accuracy"], s=18, c="0.6", label="trials")
        ax.step(front[cost], front["accuracy"], where="post", c="C3")
        ax.scatter(front[cost], front["accuracy"], s=30, c="C3", label="Pareto front")
        early = stopped[stopped["outcome"] == "stopped"] if stopped is not None and len(stopped) else None
        if early is not None and f"predicted_{cost}" in early and len(early):
            ax.scatter(
                early[f"predicted_{cost}"],
                early["val_accuracy"],
                marker="x",
                s=24,
                c="0.45",
                label="stopped early (at its rung)",
            )
        if teacher and teacher.get(cost):
            ax.scatter([teacher[cost]], [teacher["accuracy"]], marker="*", s=160, c="C0", label="teacher")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(COSTS[cost])
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _robust_panel(ax: Any, table: pd.DataFrame, teacher: dict[str, Any] | None) -> None:
    import matplotlib.ticker

    front = table[table["pareto_robust_bytes"]].sort_values("bytes")
    ax.scatter(table["bytes"], table["corruption_accuracy"], s=18, c="0.6", label="trials")
    ax.step(front["bytes"], front["corruption_accuracy"], where="post", c="C2")
    ax.scatter(front["bytes"], front["corruption_accuracy"], s=30, c="C2", label="robustness front")
    if teacher and teacher.get("bytes") and teacher.get("corruption_accuracy") is not None:
        ax.scatter([teacher["bytes"]], [teacher["corruption_accuracy"]], marker="*", s=160, c="C0", label="teacher")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(COSTS["bytes"])
    ax.set_ylabel("mean corruption accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
