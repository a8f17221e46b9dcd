"""The measured trials of an experiment directory, as tables.

Works on any experiment directory, finished or interrupted: Tune writes each trial's
reports to its ``result.json`` as they come, so every trial that reached its final
measurement contributes one row, and every trial that ended before it (stopped by the
scheduler, or errored) one row of the other table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from effray.errors import EffrayError

# latency_ms: the exported file's on --deploy's runtime (the first --latency-on target), else the eager module's
COSTS = {"bytes": "bytes on disk", "macs": "MACs", "latency_ms": "latency (ms, batch 1)"}
TARGET_LATENCY = "latency_ms_b1@"  # + a --latency-on target: that target's latency column
OBJECTIVES = {"accuracy": "accuracy", "robustness": "corruption_accuracy"}  # --objective -> the column it maximises
BEYOND = ("macro_f1", "worst_class_recall", "ece", "corruption_accuracy")  # what accuracy hides (effray.metrics)
# post-hoc temperature scaling (effray.metrics.scaled_calibration): T and the ECE/NLL it gives
CALIBRATION = ("temperature", "ece_scaled", "nll_scaled")
FINAL_KEY = "final"
STOPPED_FILE = "stopped.json"  # the pareto scheduler's record of the trials it stopped, and why
TEACHER_FILE = "teacher.json"  # the teacher's measurement, every ratio's denominator
TEST_FILE = "test.json"  # the teacher and the front scored on the test split (effray.search.holdout)
TEST_COLUMNS = ("accuracy", "accuracy_low", "accuracy_high", "worst_class_recall", "ece_scaled")  # as test_<key>


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
    decisions_file = root / STOPPED_FILE
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
            reason=why.get("reason", "dominated" if why else ""),
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


def load_test_scores(experiment_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The experiment's ``test.json``, if the search scored its front on a test split."""
    path = Path(experiment_dir) / TEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def with_test_columns(table: pd.DataFrame, scores: dict[str, Any] | None) -> pd.DataFrame:
    """``table`` with a ``test_<key>`` column per :data:`TEST_COLUMNS` for the trials
    ``scores`` holds (NaN for the others: models off the front were not scored on test)."""
    if not scores or not scores.get("trials"):
        return table
    out = table.copy()
    for key in TEST_COLUMNS:
        out[f"test_{key}"] = [scores["trials"].get(str(t), {}).get(key, float("nan")) for t in out["trial_id"]]
    return out


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
