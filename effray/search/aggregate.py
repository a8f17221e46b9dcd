"""Aggregate measured models into a table, Pareto fronts, a plot and budget picks.

Works on any experiment directory, finished or interrupted: every trial that reached
its final measurement contributes one row. Objectives: accuracy (higher is better)
against bytes on disk, MACs and latency (lower is better).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from effray.atomic import write_file
from effray.config import option, require
from effray.errors import EffrayError
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

    def validate(self) -> None:
        require(bool(self.experiment), "give the experiment directory: effray report --experiment DIR")
        require(
            self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
        )
        require(self.max_size_kb >= 0 and self.max_latency_ms >= 0, "--max-size-kb and --max-latency-ms must be >= 0")


COSTS = {"bytes": "bytes on disk", "macs": "MACs", "latency_ms": "latency (ms, batch 1)"}
OBJECTIVES = {"accuracy": "accuracy", "robustness": "corruption_accuracy"}  # --objective -> the column it maximises
BEYOND = ("macro_f1", "worst_class_recall", "ece", "corruption_accuracy")  # what accuracy hides (effray.metrics)
FINAL_KEY = "final"


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


def _records(result: Path) -> list[dict[str, Any]]:
    """A trial's reports from Tune's ``result.json`` (JSON lines, oldest first), skipping a
    line cut off by a crash."""
    out = []
    for line in result.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def load_stopped(experiment_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per trial that ended without a final measurement: stopped early by the
    scheduler (with its rung, rank and dominating trials when the pareto scheduler kept
    ``stopped.json``) or errored."""
    root = Path(experiment_dir)
    decisions_file = root / "stopped.json"
    decisions = json.loads(decisions_file.read_text()) if decisions_file.is_file() else {}
    rows = []
    for result in sorted(root.rglob("result.json")):
        records = _records(result)
        if not records or any(r.get(FINAL_KEY) for r in records):
            continue
        last = records[-1]
        row = _flatten(last, trial_dir=str(result.parent))
        row.pop("artifact", None)  # its checkpoint is a fine-tune in progress, not a model
        why = decisions.get(str(row["trial_id"]), {})
        errored = any(result.parent.glob("error.*"))
        row.update(
            outcome="errored" if errored else "stopped",
            rung=why.get("rung", last.get("epoch")),
            rank=why.get("rank"),
            dominated_by=",".join(why.get("dominated_by", [])),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def load_trials(experiment_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per trial with a final measurement, from every ``result.json`` below the
    experiment directory (Tune writes one per trial, JSON lines, newest last)."""
    root = Path(experiment_dir)
    if not root.is_dir():
        raise EffrayError(
            f"experiment directory {str(root)!r} does not exist; pass the directory `effray tune` printed"
        )
    rows = []
    for result in sorted(root.rglob("result.json")):
        finals = [r for r in _records(result) if r.get(FINAL_KEY)]
        if finals:
            rows.append(_flatten(finals[-1], trial_dir=str(result.parent)))
    if not rows:
        raise EffrayError(
            f"no finished trials under {root}; let at least one trial complete (or re-run `effray tune` to resume)"
        )
    return pd.DataFrame(rows)


def _flatten(record: dict[str, Any], trial_dir: str) -> dict[str, Any]:
    row: dict[str, Any] = {"trial_dir": trial_dir, "trial_id": record.get("trial_id", Path(trial_dir).name)}
    checkpoints = sorted(Path(trial_dir).glob("checkpoint_*/model.pt"))
    if checkpoints:  # the trial kept its artifact as its (only) checkpoint
        row["artifact"] = str(checkpoints[-1].resolve())
    for key, value in record.items():
        if key == "config" and isinstance(value, dict):
            for ck, cv in _walk(value, "config"):
                row[ck] = cv
        elif not isinstance(value, (dict, list)):
            row[key] = value
    return row


def _walk(d: dict[str, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}.{k}")
        else:
            yield f"{prefix}.{k}", v if not isinstance(v, list) else json.dumps(v)


def add_pareto_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``pareto_<cost>`` boolean columns for every cost the table has."""
    out = df.copy()
    for cost in COSTS:
        if cost in out.columns and "accuracy" in out.columns:
            out[f"pareto_{cost}"] = pareto_mask(out["accuracy"], out[cost])
    if "corruption_accuracy" in out.columns and "bytes" in out.columns:  # the robustness front
        out["pareto_robust_bytes"] = pareto_mask(out["corruption_accuracy"], out["bytes"])
    return out


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
    keep = np.ones(len(df), dtype=bool)
    if max_size_kb is not None:
        keep &= df["bytes"].to_numpy() <= max_size_kb * 1024
    if max_latency_ms is not None:
        keep &= df["latency_ms"].to_numpy() <= max_latency_ms
    within = df[keep]
    if within.empty:
        return None
    return within.sort_values([score, "bytes"], ascending=[False, True]).iloc[0]


def write_report(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    teacher: dict[str, Any] | None = None,
    max_size_kb: float | None = None,
    max_latency_ms: float | None = None,
    stopped: pd.DataFrame | None = None,
    objective: str = "accuracy",
) -> dict[str, Any]:
    """Write results.parquet/.csv, report.md and pareto.png; return the summary.
    ``stopped``: the trials that ended before their final measurement (:func:`load_stopped`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = add_pareto_columns(df).sort_values("accuracy", ascending=False).reset_index(drop=True)
    stopped = stopped if stopped is not None else pd.DataFrame()
    hv = (
        hypervolume(table["accuracy"], table["bytes"], float(teacher["bytes"]))
        if teacher and teacher.get("bytes")
        else None
    )
    write_file(out / "results.parquet", lambda p: table.to_parquet(p, index=False))
    write_file(out / "results.csv", lambda p: table.to_csv(p, index=False))
    pick = best_within(table, max_size_kb, max_latency_ms, objective) if (max_size_kb or max_latency_ms) else None
    write_file(
        out / "report.md",
        lambda p: p.write_text(_markdown(table, teacher, pick, max_size_kb, max_latency_ms, stopped, hv, objective)),
    )
    write_file(out / "pareto.png", lambda p: plot_pareto(table, p, teacher, stopped))
    summary: dict[str, Any] = {
        "trials": len(table),
        "hypervolume": hv,
        "stopped_early": int((stopped["outcome"] == "stopped").sum()) if len(stopped) else 0,
        "report": str((out / "report.md").resolve()),
        "pareto": {c: int(table[f"pareto_{c}"].sum()) for c in COSTS if f"pareto_{c}" in table},
        "best_accuracy": float(table["accuracy"].max()),
    }
    if max_size_kb or max_latency_ms:
        summary["budget_pick"] = (
            None
            if pick is None
            else {
                "trial_id": pick["trial_id"],
                "accuracy": float(pick["accuracy"]),
                "objective": objective,
                "bytes": int(pick["bytes"]),
                "artifact": pick.get("artifact"),
                **(
                    {"corruption_accuracy": float(pick["corruption_accuracy"])} if "corruption_accuracy" in pick else {}
                ),
            }
        )
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "★" if value else ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _markdown(
    table: pd.DataFrame,
    teacher: dict[str, Any] | None,
    pick: pd.Series | None,
    max_size_kb: float | None,
    max_latency_ms: float | None,
    stopped: pd.DataFrame,
    hv: float | None,
    objective: str = "accuracy",
) -> str:
    cols = [
        c
        for c in (
            "trial_id",
            "accuracy",
            *BEYOND,
            "bytes",
            "macs",
            "latency_ms",
            "size_ratio",
            "pareto_bytes",
            "pareto_macs",
            "pareto_latency_ms",
            "pareto_robust_bytes",
        )
        if c in table
    ]
    cols += [c for c in ("predicted_bytes", "setup_s") if c in table]
    cols += [
        c
        for c in table.columns
        if c.startswith("config.")
        and not c.startswith(("config.predicted.", "config.context."))
        and table[c].nunique(dropna=False) > 1
    ]
    lines = ["# effray compression report", ""]
    if teacher:
        beyond = "".join(f", {k.replace('_', ' ')} {_fmt(teacher[k])}" for k in BEYOND if teacher.get(k) is not None)
        lines += [
            f"Teacher: accuracy {_fmt(teacher.get('accuracy'))}{beyond}, {_fmt(teacher.get('bytes'))} bytes, "
            f"{_fmt(teacher.get('macs'))} MACs, {_fmt(teacher.get('latency_ms'))} ms.",
            "",
        ]
    lines += [
        f"{len(table)} measured trials, sorted by accuracy. ★ marks Pareto-optimal rows (accuracy vs that cost; "
        "pareto_robust_bytes: mean corruption accuracy vs bytes). macro_f1, worst_class_recall and ece (15-bin "
        "expected calibration error) are on the val split; corruption_accuracy is the mean accuracy under the "
        "search's corruptions and severities.",
        "",
    ]
    if hv is not None:
        lines += [
            f"Hypervolume of the accuracy-vs-bytes front: **{hv:.4f}** (the area it dominates in accuracy × "
            "ln(bytes), from accuracy 0 and the teacher's fp32 size).",
            "",
        ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    if teacher:  # the baseline every score is read against
        base = {**teacher, "trial_id": "teacher (fp32)", "size_ratio": 1.0}
        lines += [
            "| "
            + " | ".join(_fmt(base[c]) if base.get(c) is not None and not c.startswith("pareto_") else "" for c in cols)
            + " |"
        ]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for _, row in table.iterrows()]
    if len(stopped):
        scols = [
            c
            for c in ("trial_id", "outcome", "rung", "val_accuracy", "predicted_bytes", "rank", "dominated_by")
            if c in stopped
        ]
        scols += [c for c in cols if c.startswith("config.") and c in stopped]
        lines += [
            "",
            f"## Ended before their final measurement ({len(stopped)})",
            "",
            "Stopped early at the rung (epoch) shown, with the accuracy it had there and its predicted size; "
            "rank is its non-dominated front at that rung, dominated_by the trials that beat it in both.",
            "",
        ]
        lines += ["| " + " | ".join(scols) + " |", "|" + "---|" * len(scols)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in scols) + " |" for _, row in stopped.iterrows()]
    if max_size_kb or max_latency_ms:
        budget = ", ".join(
            b
            for b in (f"≤ {max_size_kb} KB" if max_size_kb else "", f"≤ {max_latency_ms} ms" if max_latency_ms else "")
            if b
        )
        lines += ["", f"## Best within budget ({budget}), by {OBJECTIVES[objective].replace('_', ' ')}", ""]
        lines += [
            "No trial fits this budget."
            if pick is None
            else f"Trial {pick['trial_id']}: accuracy {_fmt(pick['accuracy'])}"
            + (f", corruption accuracy {_fmt(pick['corruption_accuracy'])}" if "corruption_accuracy" in pick else "")
            + f", {int(pick['bytes'])} bytes, artifact `{pick.get('artifact')}`"
        ]
    return "\n".join(lines) + "\n"


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
        for key in ("trial_id", "accuracy", "bytes", "macs", "latency_ms", "artifact"):
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
    teacher_file = Path(cfg.experiment) / "teacher.json"
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
    )
    if tracking is not None and tracking.mode != "disabled":
        log_summary(out, summary, tracking, teacher)
    return summary
