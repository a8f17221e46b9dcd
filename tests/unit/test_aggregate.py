"""Pareto fronts, budget picks and the report files, against brute force and real files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from effray.errors import EffrayError
from effray.search.aggregate import best_within, load_trials, pareto_mask, write_report


def brute_force(acc, cost):
    n = len(acc)
    return np.array([
        not any(acc[j] >= acc[i] and cost[j] <= cost[i] and (acc[j] > acc[i] or cost[j] < cost[i]) for j in range(n))
        for i in range(n)
    ])  # fmt: skip


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
    return pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"],
        "accuracy": [0.90, 0.85, 0.80, 0.70],
        "bytes": [40_000, 10_000, 20_000, 4_000],
        "macs": [4e7, 2e7, 1e7, 5e6],
        "latency_ms": [2.0, 1.5, 1.0, 1.2],
        "artifact": ["/x/a", "/x/b", "/x/c", "/x/d"],
        "config.bits": [8, 4, 4, 2],
    })  # fmt: skip


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
        lines = [{"accuracy": 0.1, "epoch": 0}, {**{k: v for k, v in row.items() if not k.startswith("config.")},
                 "final": True, "config": {"bits": int(row["config.bits"])}}]  # fmt: skip
        (d / "result.json").write_text("\n".join(json.dumps(x, default=float) for x in lines) + "\n{\"trunc")
    (exp / "trial_unfinished").mkdir()
    (exp / "trial_unfinished" / "result.json").write_text(json.dumps({"accuracy": 0.5}) + "\n")
    df = load_trials(exp)
    assert sorted(df["trial_id"]) == ["a", "b", "c", "d"]
    summary = write_report(df, tmp_path / "report", teacher={"accuracy": 0.92, "bytes": 1e6, "macs": 4e7, "latency_ms": 3},
                           max_size_kb=20)  # fmt: skip
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
