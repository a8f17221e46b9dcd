"""--max-drop and the tail limits: made absolute with the teacher's scores, applied to the
results table, and the pick they give (the cheapest model within them, as NNCF's max_drop)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from effray.cli import main
from effray.errors import EffrayError
from effray.search.aggregate import write_report
from effray.search.constraints import Constraints
from effray.search.fronts import cheapest_within
from effray.search.holdout import front_artifacts

TEACHER = {"accuracy": 0.90, "worst_class_recall": 0.80, "corruption_accuracy": 0.70, "bytes": 1e6}


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e"],
            "accuracy": [0.895, 0.88, 0.86, 0.70, 0.885],
            "worst_class_recall": [0.79, 0.60, 0.77, 0.5, 0.78],
            "ece_scaled": [0.02, 0.03, 0.08, 0.01, np.nan],
            "corruption_accuracy": [0.69, 0.68, 0.60, 0.40, 0.67],
            "bytes": [40_000, 10_000, 8_000, 1_000, 12_000],
            "macs": [4e7, 1e7, 2e7, 1e6, 3e7],
            "latency_ms": [2.0, 1.0, 0.5, 0.2, 3.0],
            "artifact": [f"/x/{t}" for t in "abcde"],
        }
    )


@pytest.mark.parametrize(
    ("limits", "within"),
    [
        (Constraints(), "abcde"),
        (Constraints(max_drop=2.0), "abe"),  # 0.90 - 0.02 = 0.88: b is on the line and in
        (Constraints(max_drop=2.0, max_worst_class_drop=5.0), "ae"),
        (Constraints(max_ece=0.05), "abd"),  # e has no ECE: not within
        (Constraints(max_drop=5.0, max_corruption_drop=2.0), "ab"),
    ],
)
def test_limits_are_made_absolute_with_the_teachers_scores(limits, within):
    table = _table()
    assert "".join(table["trial_id"][limits.within(table, TEACHER)]) == within


def test_the_pick_is_the_cheapest_within_every_limit_and_the_budget():
    table = _table()
    assert cheapest_within(table, TEACHER, Constraints(max_drop=2.0))["trial_id"] == "b"
    assert cheapest_within(table, TEACHER, Constraints(max_drop=2.0), cost="macs")["trial_id"] == "b"
    assert cheapest_within(table, TEACHER, Constraints(max_drop=2.0), cost="latency")["trial_id"] == "b"
    assert cheapest_within(table, TEACHER, Constraints(max_drop=5.0), cost="latency")["trial_id"] == "c"
    assert cheapest_within(table, TEACHER, Constraints(max_drop=2.0, max_worst_class_drop=5.0))["trial_id"] == "e"
    assert cheapest_within(table, TEACHER, Constraints(max_drop=2.0), max_size_kb=9) is None  # b is 9.8 KB
    tie = pd.concat([table, table.iloc[[1]].assign(trial_id="b2", accuracy=0.889)], ignore_index=True)
    assert cheapest_within(tie, TEACHER, Constraints(max_drop=2.0))["trial_id"] == "b2"  # same bytes: more accurate
    with pytest.raises(EffrayError, match="--robust-images > 0"):
        cheapest_within(table.drop(columns="corruption_accuracy"), TEACHER, Constraints(max_corruption_drop=1.0))


def test_the_report_names_the_limits_and_their_pick(tmp_path):
    limits = Constraints(max_drop=2.0, max_worst_class_drop=5.0)
    summary = write_report(_table(), tmp_path / "r", teacher=TEACHER, limits=limits)
    assert summary["budget_pick"]["trial_id"] == "e" and summary["budget_pick"]["objective"].startswith("cheapest")
    assert summary["limits"] == "accuracy drop ≤ 2 pt, worst-class recall drop ≤ 5 pt"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Cheapest within the limits (accuracy drop ≤ 2 pt, worst-class recall drop ≤ 5 pt;" in md
    assert "Trial e: accuracy 0.885" in md
    none = write_report(_table(), tmp_path / "none", teacher=TEACHER, limits=Constraints(max_drop=0.1))
    assert (
        none["budget_pick"] is None and "No trial meets these limits." in (tmp_path / "none" / "report.md").read_text()
    )


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--max-drop", "-1"], "--max-drop is in points of accuracy, 0-100"),
        (["--max-worst-class-drop", "101"], "--max-worst-class-drop is in points of accuracy"),
        (["--max-ece", "1.5"], "--max-ece is an ECE in [0, 1)"),
        (["--max-corruption-drop", "2", "--robust-images", "0"], "--max-corruption-drop needs the corruption score"),
        (["--prune-to-latency"], "--prune-to-latency prunes to --max-latency-ms: give the target"),
    ],
)
def test_bad_limits_fail_in_one_line_before_anything_runs(tmp_path, capsys, flags, fragment):
    args = ["tune", "--teacher", str(tmp_path / "t"), "--data", str(tmp_path / "d"), "--storage", str(tmp_path / "s")]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_the_test_split_scores_the_front_and_every_model_within_the_limits(tmp_path):
    """Which artifacts the search reads the test split for: on a front, or a candidate of the pick."""
    exp = tmp_path / "exp"
    dominated = {"trial_id": "f", "accuracy": 0.80, "bytes": 50_000, "macs": 5e7, "latency_ms": 5.0}
    dominated.update(worst_class_recall=0.7, ece_scaled=0.01, corruption_accuracy=0.3, artifact="")
    for _, row in pd.concat([_table(), pd.DataFrame([dominated])], ignore_index=True).iterrows():
        d = exp / f"trial_{row['trial_id']}"
        (d / "checkpoint_000000").mkdir(parents=True)
        (d / "checkpoint_000000" / "model.pt").write_bytes(b"")
        (d / "result.json").write_text(json.dumps({**row.drop("artifact").to_dict(), "final": True}) + "\n")
    assert set(front_artifacts(exp)) == set("abcde")  # f is beaten in accuracy and in every cost
    with_limits = front_artifacts(exp, TEACHER, Constraints(max_drop=11.0))  # the floor 0.79 lets f in
    assert set(with_limits) == set("abcdef") and with_limits["f"].endswith("trial_f/checkpoint_000000/model.pt")
    assert set(front_artifacts(exp, TEACHER, Constraints(max_drop=5.0))) == set("abcde")


def test_the_limits_a_trial_is_held_to_while_it_trains_reach_the_scheduler():
    """--max-drop, --max-worst-class-drop, --max-ece and --max-corruption-drop are scored every
    epoch, so the pareto scheduler gets the drops as floors and the ECE as a ceiling on the
    epochs' names."""
    from effray.search.config import TuneConfig
    from effray.search.driver import _scheduler

    limits = Constraints(max_drop=2.0, max_worst_class_drop=5.0, max_ece=0.05, max_corruption_drop=3.0)
    floors, ceilings = limits.floors(TEACHER), limits.ceilings(TEACHER)
    assert floors == pytest.approx({"accuracy": 0.88, "worst_class_recall": 0.75, "corruption_accuracy": 0.67})
    assert ceilings == {"ece_scaled": 0.05}
    scheduler = _scheduler(TuneConfig(scheduler="pareto"), "/tmp/unused", floors, ceilings)
    assert scheduler._floors == pytest.approx(
        {"val_accuracy": 0.88, "val_worst_class_recall": 0.75, "val_corruption_accuracy": 0.67}
    )
    assert scheduler._ceilings == {"val_ece_scaled": 0.05}
    assert Constraints(max_ece=0.05).floors(TEACHER) == {} and Constraints(max_drop=1.0).ceilings(TEACHER) == {}
