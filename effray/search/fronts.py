"""Pareto fronts of accuracy against a cost, their hypervolume, and the best pick within a budget.

Accuracy is higher-is-better; bytes on disk, MACs and latency are lower-is-better.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from effray.errors import EffrayError
from effray.search.constraints import Constraints
from effray.search.results import COSTS, OBJECTIVES, TARGET_LATENCY

PICK_COSTS = {"bytes": "bytes", "macs": "macs", "latency": "latency_ms"}  # --objective -> the column the pick minimises


def pareto_mask(accuracy: Iterable[float], cost: Iterable[float]) -> np.ndarray:
    """True where no other point is at least as accurate and at most as costly with one
    strict improvement. Exact duplicates do not dominate each other: both stay."""
    acc = np.asarray(list(accuracy), dtype=float)
    cst = np.asarray(list(cost), dtype=float)
    if acc.shape != cst.shape:
        raise ValueError("accuracy and cost must have the same length")
    valid = np.isfinite(acc) & np.isfinite(cst)
    mask = np.zeros(len(acc), dtype=bool)
    # sweep by cost ascending, accuracy descending: a point is on the front iff it beats
    # the best accuracy seen at strictly lower cost and ties the best at its own cost
    order = np.lexsort((-acc, cst))
    best_below = -np.inf
    i = 0
    idx = [k for k in order if valid[k]]
    while i < len(idx):
        j = i
        while j < len(idx) and cst[idx[j]] == cst[idx[i]]:
            j += 1
        group = idx[i:j]
        top = max(acc[k] for k in group)
        if top > best_below:
            for k in group:
                mask[k] = acc[k] == top
            best_below = top
        i = j
    return mask


def hypervolume(accuracy: Iterable[float], cost: Iterable[float], ref_cost: float, ref_accuracy: float = 0.0) -> float:
    """The area a front dominates in (accuracy, ln cost) up to the reference point
    (``ref_accuracy``, ``ref_cost``): one number for how good and how wide a front is,
    comparable between searches with the same reference (effray: accuracy 0 and the
    teacher's fp32 size). Points costlier than the reference or no better than its
    accuracy add nothing."""
    acc = np.asarray(list(accuracy), dtype=float)
    cst = np.asarray(list(cost), dtype=float)
    keep = np.isfinite(acc) & np.isfinite(cst) & (cst > 0) & (cst < ref_cost) & (acc > ref_accuracy)
    if not keep.any():
        return 0.0
    acc, cst = acc[keep], np.log(cst[keep])
    front = pareto_mask(acc, cst)
    order = np.argsort(cst[front])
    fc, fa = cst[front][order], acc[front][order]
    edges = np.append(fc[1:], np.log(ref_cost))
    return float(np.sum((edges - fc) * (fa - ref_accuracy)))


def add_pareto_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``pareto_<cost>`` boolean columns for every cost the table has, a target's latency
    (``latency_ms_b1@<target>``) among them."""
    out = df.copy()
    # one latency front per --latency-on target besides the first's (latency_ms)
    for cost in [*COSTS, *(c for c in df.columns if c.startswith(TARGET_LATENCY))]:
        if cost in out.columns and "accuracy" in out.columns:
            out[f"pareto_{cost}"] = pareto_mask(out["accuracy"], out[cost])
    if "corruption_accuracy" in out.columns and "bytes" in out.columns:  # the robustness front
        out["pareto_robust_bytes"] = pareto_mask(out["corruption_accuracy"], out["bytes"])
    return out


def on_a_front(table: pd.DataFrame) -> np.ndarray:
    """Which rows are on any of the table's Pareto fronts (every row when it has no marks):
    the models the report calls the front, and the test split scores."""
    marks = [c for c in table.columns if c.startswith("pareto_")]
    return np.array(table[marks].eq(True).any(axis=1), dtype=bool) if marks else np.ones(len(table), dtype=bool)


def _budget(df: pd.DataFrame, max_size_kb: float | None, max_latency_ms: float | None) -> np.ndarray:
    keep = np.ones(len(df), dtype=bool)
    if max_size_kb is not None:
        keep &= df["bytes"].to_numpy() <= max_size_kb * 1024
    if max_latency_ms is not None:
        keep &= df["latency_ms"].to_numpy() <= max_latency_ms
    return keep


def best_within(
    df: pd.DataFrame, max_size_kb: float | None = None, max_latency_ms: float | None = None, objective: str = "accuracy"
) -> pd.Series | None:
    """The best row by ``objective`` (accuracy, or robustness: mean corruption accuracy)
    within the budget (smaller artifact breaks ties), or None."""
    score = OBJECTIVES[objective]
    if score not in df or df[score].isna().all():
        raise EffrayError(
            f"--objective {objective} needs the trials' {score}; this experiment has none "
            "(run `effray tune` with --robust-images > 0)"
        )
    within = df[_budget(df, max_size_kb, max_latency_ms)]
    if within.empty:
        return None
    return within.sort_values([score, "bytes"], ascending=[False, True]).iloc[0]


def cheapest_within(
    df: pd.DataFrame,
    teacher: dict,
    limits: Constraints,
    cost: str = "bytes",
    max_size_kb: float | None = None,
    max_latency_ms: float | None = None,
) -> pd.Series | None:
    """The cheapest row by ``cost`` (bytes, macs or latency) that meets every limit against
    ``teacher`` and the budget (the more accurate breaks ties), or None: NNCF's
    ``max_drop`` answer, the smallest model within the drop."""
    column = PICK_COSTS[cost]
    if column not in df or df[column].isna().all():
        raise EffrayError(f"the pick minimises {column} (--objective {cost}); this experiment has none")
    within = df[limits.within(df, teacher) & _budget(df, max_size_kb, max_latency_ms)]
    if within.empty:
        return None
    return within.sort_values([column, "accuracy"], ascending=[True, False]).iloc[0]
