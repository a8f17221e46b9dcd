"""Pareto fronts, budget picks and the report files, against brute force and real files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from effray.errors import EffrayError
from effray.search.aggregate import write_report
from effray.search.fronts import best_within, hypervolume, pareto_mask
from effray.search.results import load_stopped, load_trials


def brute_force(acc, cost):
    n = len(acc)
    return np.array(
        [
            not any(
                acc[j] >= acc[i] and cost[j] <= cost[i] and (acc[j] > acc[i] or cost[j] < cost[i]) for j in range(n)
            )
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("seed", range(20))
def test_pareto_matches_brute_force_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    acc = rng.integers(0, 8, n) / 8  # coarse values force ties
    cost = rng.integers(1, 6, n).astype(float)
    if n > 2:
        acc[1], cost[1] = acc[0], cost[0]  # an exact duplicate
    np.testing.assert_array_equal(pareto_mask(acc, cost), brute_force(acc, cost))


def test_pareto_edge_cases():
    assert pareto_mask([], []).tolist() == []
    assert pareto_mask([0.5, 0.5], [1, 1]).tolist() == [True, True]
    assert pareto_mask([0.9, 0.9], [1, 2]).tolist() == [True, False]
    assert pareto_mask([0.9, np.nan], [1, 2]).tolist() == [True, False]


def _table():
    return pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "accuracy": [0.90, 0.85, 0.80, 0.70],
            "bytes": [40_000, 10_000, 20_000, 4_000],
            "macs": [4e7, 2e7, 1e7, 5e6],
            "latency_ms": [2.0, 1.5, 1.0, 1.2],
            "artifact": ["/x/a", "/x/b", "/x/c", "/x/d"],
            "config.bits": [8, 4, 4, 2],
        }
    )


def test_budget_selection():
    t = _table()
    assert best_within(t, max_size_kb=20)["trial_id"] == "b"  # 0.85 at 10 KB beats 0.80 at 20 KB
    assert best_within(t, max_size_kb=5)["trial_id"] == "d"
    assert best_within(t, max_size_kb=20, max_latency_ms=1.2)["trial_id"] == "c"
    assert best_within(t, max_size_kb=1) is None


def test_report_files_from_trial_dirs(tmp_path):
    exp = tmp_path / "exp"
    for _, row in _table().iterrows():
        d = exp / f"trial_{row['trial_id']}"
        d.mkdir(parents=True)
        lines = [
            {"accuracy": 0.1, "epoch": 0},
            {
                **{k: v for k, v in row.items() if not k.startswith("config.")},
                "final": True,
                "config": {"bits": int(row["config.bits"])},
            },
        ]
        (d / "result.json").write_text("\n".join(json.dumps(x, default=float) for x in lines) + '\n{"trunc')
    (exp / "trial_unfinished").mkdir()
    (exp / "trial_unfinished" / "result.json").write_text(json.dumps({"accuracy": 0.5}) + "\n")
    df = load_trials(exp)
    assert sorted(df["trial_id"]) == ["a", "b", "c", "d"]
    summary = write_report(
        df, tmp_path / "report", teacher={"accuracy": 0.92, "bytes": 1e6, "macs": 4e7, "latency_ms": 3}, max_size_kb=20
    )
    out = tmp_path / "report"
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["trial_id"]) == ["a", "b", "c", "d"]  # sorted by accuracy
    assert table.set_index("trial_id")["pareto_bytes"].to_dict() == {"a": True, "b": True, "c": False, "d": True}
    assert pd.read_csv(out / "results.csv").shape[0] == 4
    md = (out / "report.md").read_text()
    assert "Best within budget" in md and "Trial b" in md and "config.bits" in md
    assert summary["budget_pick"]["trial_id"] == "b" and summary["pareto"]["bytes"] == 3
    img = np.asarray(Image.open(out / "pareto.png"))
    assert img.shape[0] > 200 and img.std() > 10
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_missing_or_empty_experiment(tmp_path):
    with pytest.raises(EffrayError, match="does not exist"):
        load_trials(tmp_path / "nope")
    with pytest.raises(EffrayError, match="no finished trials"):
        load_trials(tmp_path)


def test_hypervolume_by_hand_and_its_invariances():
    import math

    ref = 1000.0
    # front (100 B, 0.5), (400 B, 0.8); a dominated point adds nothing
    hv = hypervolume([0.5, 0.8, 0.4], [100.0, 400.0, 500.0], ref)
    want = (math.log(400) - math.log(100)) * 0.5 + (math.log(1000) - math.log(400)) * 0.8
    assert hv == pytest.approx(want)
    assert hypervolume([0.5, 0.8], [100.0, 400.0], ref) == pytest.approx(want)
    assert hypervolume([0.9], [2000.0], ref) == 0.0  # costlier than the reference
    assert hypervolume([], [], ref) == 0.0
    # a new non-dominated point only adds; scaling every cost and the reference changes nothing
    assert hypervolume([0.5, 0.8, 0.3], [100.0, 400.0, 10.0], ref) > hv
    assert hypervolume([0.5, 0.8], [10.0, 40.0], 100.0) == pytest.approx(want)


def test_stopped_trials_are_listed_with_their_rung_and_who_dominated_them(tmp_path):
    exp = tmp_path / "exp"
    for trial, rows in {
        "a": [
            {"val_accuracy": 0.6, "epoch": 1, "predicted_bytes": 100},
            {"accuracy": 0.6, "bytes": 101, "final": True, "macs": 5, "latency_ms": 1.0},
        ],
        "b": [{"val_accuracy": 0.3, "epoch": 1, "predicted_bytes": 200}],
        "c": [{"val_accuracy": 0.5, "epoch": 1, "predicted_bytes": 300}],
    }.items():
        d = exp / f"trial_{trial}"
        d.mkdir(parents=True)
        (d / "result.json").write_text("\n".join(json.dumps({**r, "trial_id": trial}) for r in rows) + "\n")
    (exp / "trial_c" / "error.txt").write_text("boom")
    (exp / "stopped.json").write_text(json.dumps({"b": {"rung": 1, "rank": 2, "dominated_by": ["a"]}}))
    stopped = load_stopped(exp).set_index("trial_id")
    assert sorted(stopped.index) == ["b", "c"]
    assert (
        stopped.loc["b", "outcome"] == "stopped"
        and stopped.loc["b", "rung"] == 1
        and stopped.loc["b", "dominated_by"] == "a"
    )
    assert stopped.loc["c", "outcome"] == "errored"
    summary = write_report(
        load_trials(exp),
        tmp_path / "report",
        teacher={"accuracy": 0.7, "bytes": 1000, "macs": 9},
        stopped=load_stopped(exp),
    )
    md = (tmp_path / "report" / "report.md").read_text()
    assert summary["stopped_early"] == 1 and summary["hypervolume"] > 0
    assert "Ended before their final measurement (2)" in md and "| b | stopped | 1 |" in md


def test_robustness_columns_front_panel_and_pick(tmp_path):
    t = _table().assign(
        corruption_accuracy=[0.50, 0.62, 0.60, 0.40],
        macro_f1=[0.9, 0.84, 0.79, 0.69],
        worst_class_recall=[0.8, 0.7, 0.6, 0.5],
        ece=[0.02, 0.03, 0.05, 0.08],
    )
    # within 40 KB: the most accurate is a, the most robust is b
    assert best_within(t, max_size_kb=40)["trial_id"] == "a"
    assert best_within(t, max_size_kb=40, objective="robustness")["trial_id"] == "b"
    with pytest.raises(EffrayError, match="--robust-images"):
        best_within(_table(), max_size_kb=40, objective="robustness")
    teacher = {
        "accuracy": 0.92,
        "bytes": 1e6,
        "macs": 4e7,
        "latency_ms": 3,
        "corruption_accuracy": 0.66,
        "macro_f1": 0.91,
    }
    summary = write_report(t, tmp_path / "r", teacher=teacher, max_size_kb=40, objective="robustness")
    table = pd.read_parquet(tmp_path / "r" / "results.parquet").set_index("trial_id")
    # robustness vs bytes: d (cheapest), b (more robust than everything at or below 10 KB... and above)
    assert table["pareto_robust_bytes"].to_dict() == {"a": False, "b": True, "c": False, "d": True}
    assert summary["budget_pick"] == {
        "trial_id": "b",
        "accuracy": 0.85,
        "objective": "robustness",
        "bytes": 10_000,
        "artifact": "/x/b",
        "corruption_accuracy": 0.62,
    }
    md = (tmp_path / "r" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| trial_id"))
    teacher_row = next(line for line in md.splitlines() if line.startswith("| teacher (fp32)"))
    assert (
        "| 0.66 |" in teacher_row and "| 0.91 |" in teacher_row and "★" not in teacher_row
    )  # its scores, no front marks
    assert (
        "corruption accuracy 0.66" in md and "by corruption accuracy" in md
    )  # the teacher's baseline, the pick's objective
    assert all(
        f" {c} " in header
        for c in ("macro_f1", "worst_class_recall", "ece", "corruption_accuracy", "pareto_robust_bytes")
    )
    two = np.asarray(Image.open(tmp_path / "r" / "pareto.png"))
    write_report(_table(), tmp_path / "plain", teacher=teacher)
    one = np.asarray(Image.open(tmp_path / "plain" / "pareto.png"))
    assert two.shape[1] > one.shape[1] * 1.2  # a fourth panel: robustness vs bytes


def test_the_report_reads_ece_before_and_after_temperature_scaling_for_the_front_and_the_teacher(tmp_path):
    dominated = {"trial_id": "e", "accuracy": 0.6, "bytes": 50_000, "macs": 5e7, "latency_ms": 3.0, "artifact": "/x/e"}
    t = pd.concat([_table(), pd.DataFrame([{**dominated, "config.bits": 8}])], ignore_index=True).assign(
        ece=[0.20, 0.15, 0.12, 0.10, 0.30],
        ece_scaled=[0.02, 0.03, 0.04, 0.05, 0.06],
        nll=[0.9, 0.8, 0.7, 0.6, 1.2],
        nll_scaled=[0.5, 0.45, 0.4, 0.35, 1.1],
        temperature=[0.5, 0.6, 0.7, 0.8, 0.9],
    )
    teacher = {"accuracy": 0.92, "bytes": 1e6, "macs": 4e7, "latency_ms": 3, "ece": 0.2, "nll": 0.4}
    teacher.update(temperature=0.55, ece_scaled=0.01, nll_scaled=0.25)
    write_report(t, tmp_path / "r", teacher=teacher)
    md = (tmp_path / "r" / "report.md").read_text()
    section = md.split("## Calibration: post-hoc temperature scaling")[1]
    assert "fitted by NLL on the val split" in section and "selection-biased" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "→" in line][1:]  # past the header
    assert rows[0] == "| teacher (fp32) | 0.55 | 0.2 → 0.01 | 0.4 → 0.25 |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| a", "| b", "| c", "| d"]  # the front models; e is on none
    assert "| b | 0.6 | 0.15 → 0.03 | 0.8 → 0.45 |" in rows
    write_report(_table(), tmp_path / "old", teacher={"accuracy": 0.92, "bytes": 1e6})  # trials from before T
    assert "## Calibration" not in (tmp_path / "old" / "report.md").read_text()


def test_the_report_gives_the_fronts_test_accuracy_with_its_interval_beside_the_val_one_it_was_chosen_by(tmp_path):
    teacher = {"accuracy": 0.92, "bytes": 1e6, "macs": 4e7, "latency_ms": 3}
    scored = {"accuracy": 0.88, "accuracy_low": 0.86, "accuracy_high": 0.90, "worst_class_recall": 0.7}
    test = {
        "split": "test",
        "selected_on": "val",
        "interval": "95 % Wilson",
        "images": 1000,
        "teacher": {**scored, "accuracy": 0.91, "ece_scaled": 0.02},
        "trials": {"a": {**scored, "ece_scaled": 0.03}},  # only what the search scored: a is on the front
    }
    summary = write_report(_table(), tmp_path / "r", teacher=teacher, max_size_kb=10_000, test=test)
    table = pd.read_parquet(tmp_path / "r" / "results.parquet").set_index("trial_id")
    assert table.loc["a", "test_accuracy"] == 0.88 and np.isnan(table.loc["b", "test_accuracy"])
    assert summary["test"]["teacher"] == {"accuracy": 0.91, "accuracy_low": 0.86, "accuracy_high": 0.90}
    val_a = float(table.loc["a", "accuracy"])
    assert summary["test"]["front"] == {
        "a": {"val_accuracy": val_a, "accuracy": 0.88, "accuracy_low": 0.86, "accuracy_high": 0.90}
    }
    section = (tmp_path / "r" / "report.md").read_text().split("## Held-out test split")[1]
    assert "picked on val" in section and "1000 test images were read once" in section
    assert f"| a | {val_a:.4g} | 0.88 | [0.8600, 0.9000] | {val_a - 0.88:.4g} | 0.7 | 0.03 |" in section
    assert "| teacher (fp32) | 0.92 | 0.91 | [0.8600, 0.9000] | 0.01 |" in section
    assert summary["budget_pick"]["trial_id"] == "a" and summary["budget_pick"]["test_accuracy"] == 0.88
    # no test split: the report says what its accuracies are
    write_report(_table(), tmp_path / "none", teacher=teacher)
    assert "has no test split" in (tmp_path / "none" / "report.md").read_text()


def test_the_report_lays_out_each_allocated_front_models_bits_and_rates_per_layer(tmp_path):
    bits = ["", "conv=8,fc=4", "", "conv=2,fc=8", ""]
    rates = ["", "conv=0.25,fc=0", "", "conv=0.75,fc=0.5", ""]
    dominated = {"trial_id": "e", "accuracy": 0.6, "bytes": 50_000, "macs": 5e7, "latency_ms": 3.0, "artifact": "/x/e"}
    t = pd.concat([_table(), pd.DataFrame([dominated])], ignore_index=True)
    t["config.compress.layer_bits"], t["config.compress.layer_rates"] = bits, rates
    t.loc[4, ["config.compress.layer_bits", "config.compress.layer_rates"]] = ["conv=4,fc=4", "conv=0.5,fc=0.5"]
    write_report(t, tmp_path / "r", teacher={"accuracy": 0.92, "bytes": 1e6})
    md = (tmp_path / "r" / "report.md").read_text()
    assert "layer_bits" not in md.split("## Per-layer allocation")[0]  # never a cell of the trials' table
    lines = [ln for ln in md.split("## Per-layer allocation")[1].splitlines() if ln.startswith("| ")]
    assert lines == ["| layer | b | d |", "| conv | 8/0.25 | 2/0.75 |", "| fc | 4/0 | 8/0.5 |"]  # e: on no front
    write_report(_table(), tmp_path / "u", teacher={"accuracy": 0.92, "bytes": 1e6})
    assert "## Per-layer allocation" not in (tmp_path / "u" / "report.md").read_text()
