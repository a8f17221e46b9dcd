"""``effray report``: an experiment's measured trials as report files and a wandb summary run.

Works on any experiment directory, finished or interrupted. It writes the results table
(``results.parquet``/``.csv``, :mod:`effray.search.results`) with its Pareto marks
(:mod:`effray.search.fronts`), ``report.md`` (:mod:`effray.search.markdown`) and
``pareto.png`` (:mod:`effray.search.plot`), and picks the best model within a budget.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from effray.atomic import write_file
from effray.config import option, require
from effray.search.constraints import Constraints
from effray.search.fronts import PICK_COSTS, add_pareto_columns, best_within, cheapest_within, hypervolume
from effray.search.markdown import markdown
from effray.search.plot import plot_pareto
from effray.search.results import (
    COSTS,
    OBJECTIVES,
    TEACHER_FILE,
    load_stopped,
    load_test_scores,
    load_trials,
    with_test_columns,
)
from effray.tracking import TrackerSettings, make_tracker


@dataclass(frozen=True)
class ReportConfig:
    """Which experiment to aggregate, and an optional budget to pick a model for."""

    experiment: str = option("", "experiment directory written by `effray tune` (finished or interrupted)")
    out: str = option("", "where to write the report (default: EXPERIMENT/report)")
    max_size_kb: float = option(0.0, "pick the most accurate model at most this many KB on disk (0 = no limit)")
    max_latency_ms: float = option(0.0, "pick the most accurate model at most this batch-1 latency (0 = no limit)")
    objective: str = option(
        "accuracy",
        "what the budget pick maximises: accuracy, or robustness (mean corruption accuracy)",
        choices=("accuracy", "robustness"),
    )
    limits: Constraints = Constraints()  # with any limit set, the pick is the cheapest model within them all
    cost: str = option(
        "bytes", "with --max-drop or a tail limit: the cost the pick minimises", choices=tuple(PICK_COSTS)
    )

    def validate(self) -> None:
        require(bool(self.experiment), "give the experiment directory: effray report --experiment DIR")
        require(
            self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
        )
        require(self.max_size_kb >= 0 and self.max_latency_ms >= 0, "--max-size-kb and --max-latency-ms must be >= 0")


def write_report(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    teacher: dict[str, Any] | None = None,
    max_size_kb: float | None = None,
    max_latency_ms: float | None = None,
    stopped: pd.DataFrame | None = None,
    objective: str = "accuracy",
    test: dict[str, Any] | None = None,
    limits: Constraints | None = None,
    cost: str = "bytes",
) -> dict[str, Any]:
    """Write results.parquet/.csv, report.md and pareto.png; return the summary.
    ``stopped``: the trials that ended before their final measurement (:func:`load_stopped`);
    ``test``: the teacher and the front scored on the test split (``test.json``), if they were;
    ``limits``: when any is set, the pick is the cheapest by ``cost`` within them (and the budget)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = add_pareto_columns(with_test_columns(df, test)).sort_values("accuracy", ascending=False)
    table = table.reset_index(drop=True)
    stopped = stopped if stopped is not None else pd.DataFrame()
    hv = (
        hypervolume(table["accuracy"], table["bytes"], float(teacher["bytes"]))
        if teacher and teacher.get("bytes")
        else None
    )
    write_file(out / "results.parquet", lambda p: table.to_parquet(p, index=False))
    write_file(out / "results.csv", lambda p: table.to_csv(p, index=False))
    limited = limits is not None and limits.active
    picking = limited or bool(max_size_kb or max_latency_ms)
    if limited:
        require(teacher is not None, "--max-drop and the tail limits are against the teacher: no teacher.json here")
        pick = cheapest_within(table, teacher, limits, cost, max_size_kb, max_latency_ms)
    else:
        pick = best_within(table, max_size_kb, max_latency_ms, objective) if picking else None
    said = limits.describe() if limited else ""
    write_file(
        out / "report.md",
        lambda p: p.write_text(
            markdown(table, teacher, pick, max_size_kb, max_latency_ms, stopped, hv, objective, test, said)
        ),
    )
    write_file(out / "pareto.png", lambda p: plot_pareto(table, p, teacher, stopped))
    summary: dict[str, Any] = {
        "trials": len(table),
        "hypervolume": hv,
        "stopped_early": int((stopped["outcome"] == "stopped").sum()) if len(stopped) else 0,
        "report": str((out / "report.md").resolve()),
        "pareto": {c: int(table[f"pareto_{c}"].sum()) for c in COSTS if f"pareto_{c}" in table},
        "best_accuracy": float(table["accuracy"].max()),
        "test": _test_summary(table, test),
    }
    if picking:
        summary["limits"] = said or None
        summary["budget_pick"] = (
            None
            if pick is None
            else {
                "trial_id": pick["trial_id"],
                "accuracy": float(pick["accuracy"]),
                "objective": f"cheapest {cost} within the limits" if limited else objective,
                "bytes": int(pick["bytes"]),
                "artifact": pick.get("artifact"),
                **({"test_accuracy": float(pick["test_accuracy"])} if pd.notna(pick.get("test_accuracy")) else {}),
                **(
                    {"corruption_accuracy": float(pick["corruption_accuracy"])} if "corruption_accuracy" in pick else {}
                ),
            }
        )
    return summary


def _test_summary(table: pd.DataFrame, test: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the main job's JSON says of the test split: its size, that val chose, and the
    teacher's and the front's test accuracy with its interval beside the val accuracy."""
    if not test:
        return None
    scored = table[table["test_accuracy"].notna()] if "test_accuracy" in table else table.iloc[:0]
    return {
        "images": test["images"],
        "selected_on": test["selected_on"],
        "interval": test["interval"],
        "teacher": {k: test["teacher"][k] for k in ("accuracy", "accuracy_low", "accuracy_high")},
        "front": {
            str(r["trial_id"]): {
                "val_accuracy": float(r["accuracy"]),
                **{k: float(r[f"test_{k}"]) for k in ("accuracy", "accuracy_low", "accuracy_high")},
            }
            for _, r in scored.iterrows()
        },
    }


def log_summary(
    out_dir: str | os.PathLike,
    summary: dict[str, Any],
    settings: TrackerSettings,
    teacher: dict[str, Any] | None = None,
) -> None:
    """One wandb run (the experiment's summary): the results table, ``pareto.png`` and the
    best rows as summary fields. Guarded like every tracker call: wandb never fails a report."""

    out = Path(out_dir)
    table = pd.read_parquet(out / "results.parquet")
    tracker = make_tracker(settings)
    try:
        rows = [[_plain(v) for v in row] for row in table.itertuples(index=False)]
        tracker.log_table("results", [str(c) for c in table.columns], rows)
        tracker.log_image("pareto", str(out / "pareto.png"))
        best = table.iloc[0]  # sorted by accuracy
        fields: dict[str, Any] = {
            "trials": len(table),
            "best_accuracy": float(best["accuracy"]),
            **{f"pareto_count_{c}": n for c, n in summary.get("pareto", {}).items()},
        }
        for key in ("trial_id", "accuracy", "test_accuracy", "bytes", "macs", "latency_ms", "artifact"):
            if key in table:
                fields[f"best/{key}"] = _plain(best[key])
        for cost in COSTS:  # the cheapest model on each front
            if f"pareto_{cost}" in table and table[f"pareto_{cost}"].any():
                cheapest = table[table[f"pareto_{cost}"]].sort_values(cost).iloc[0]
                fields[f"cheapest_{cost}/trial_id"] = _plain(cheapest["trial_id"])
                fields[f"cheapest_{cost}/accuracy"] = float(cheapest["accuracy"])
                fields[f"cheapest_{cost}/{cost}"] = _plain(cheapest[cost])
        if summary.get("budget_pick"):
            fields.update({f"budget_pick/{k}": v for k, v in summary["budget_pick"].items()})
        if teacher:
            fields.update({f"teacher/{k}": teacher[k] for k in ("accuracy", "bytes", "macs") if k in teacher})
        if summary.get("test"):
            fields["teacher/test_accuracy"] = summary["test"]["teacher"]["accuracy"]
        tracker.set_summary(fields)
    except Exception:  # noqa: BLE001 - a malformed table still closes the run
        tracker.finish(exit_code=1)
        raise
    tracker.finish()


def _plain(value: Any) -> Any:
    """numpy scalars and NaN as plain JSON values (what wandb tables and summaries take)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def report(cfg: ReportConfig, tracking: TrackerSettings | None = None) -> dict[str, Any]:
    """``effray report``: aggregate an experiment directory into the report files; with
    ``tracking``, also log them as the experiment's wandb summary run."""
    df = load_trials(cfg.experiment)
    teacher_file = Path(cfg.experiment) / TEACHER_FILE
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
    if teacher is not None and "latency_ms" not in teacher:
        teacher["latency_ms"] = teacher.get("latency_ms_b1")
    out = cfg.out or os.path.join(cfg.experiment, "report")
    summary = write_report(
        df,
        out,
        teacher,
        cfg.max_size_kb or None,
        cfg.max_latency_ms or None,
        stopped=load_stopped(cfg.experiment),
        objective=cfg.objective,
        test=load_test_scores(cfg.experiment),
        limits=cfg.limits,
        cost=cfg.cost,
    )
    if tracking is not None and tracking.mode != "disabled":
        log_summary(out, summary, tracking, teacher)
    return summary
