"""``effray run``'s cleaning stages on the tiny real CIFAR-10 dataset: the clean stage
(kept on a re-run with the same settings, redone when they change) and the val label
issues the teacher's predictions flag."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import cli

from effray.data.arrays import load_arrays
from effray.data.prepare import load_meta
from effray.run import RunConfig, clean_stage, plan_stages, val_label_issues


def test_the_clean_stage_is_kept_on_a_rerun_and_redone_when_its_settings_change(tiny_cifar, tmp_path):
    plan = plan_stages(RunConfig(preset="demo", out=str(tmp_path / "run"), clean="drop=duplicates,leaks"))
    assert (
        plan.train.data.data == str(tmp_path / "run" / "clean" / "data") == plan.tune.data
    )  # what the teacher trains on
    plan = dataclasses.replace(plan, clean=dataclasses.replace(plan.clean, data=str(tiny_cifar)))
    first = clean_stage(plan)
    report = Path(plan.clean.out) / "clean_report.json"
    assert not first["kept"] and first["dropped"]["reasons"] == ["duplicates", "leaks"]
    assert (Path(plan.clean.out) / "data" / "meta.json").is_file()
    assert json.loads(report.read_text())["settings"] == {
        "near": False,
        "labels": False,
        "drop": "duplicates,leaks",
        "reference": "",
        "embedder": "pixels",
    }
    stamp = report.stat().st_mtime_ns
    again = clean_stage(plan)
    assert again["kept"] and again["counts"] == first["counts"] and report.stat().st_mtime_ns == stamp
    report_only = clean_stage(dataclasses.replace(plan, clean=dataclasses.replace(plan.clean, drop="")))
    assert not report_only["kept"] and report_only["dropped"] is None  # other settings: the stage runs again
    assert json.loads(report.read_text())["settings"]["drop"] == ""


def test_val_label_issues_come_from_the_teachers_predictions(tiny_cifar, teacher, tmp_path):
    out = tmp_path / "val_label_issues.parquet"
    n = val_label_issues(str(teacher), tiny_cifar, out)
    table = pd.read_parquet(out)
    val, classes = load_arrays(tiny_cifar, "val"), load_meta(tiny_cifar)["classes"]
    assert len(table) == n and n > 0  # a teacher near chance on 60 images disagrees with many labels
    assert set(table["index"]) <= set(val["index"].tolist()) and table["index"].is_unique
    assert set(table["given"]) | set(table["predicted"]) <= set(classes)
    given = dict(zip(val["index"].tolist(), val["label"].tolist(), strict=True))
    assert all(classes[given[i]] == g for i, g in zip(table["index"], table["given"], strict=True))
    assert list(table["rank"]) == sorted(table["rank"])
    assert np.all(table["given_confidence"] <= table["predicted_confidence"] + 1e-6)


@pytest.mark.parametrize(
    "section,words",
    [
        ("train: {workers: 4, cpus_per_worker: 1}", r"train: --workers 4 x --cpus-per-worker 1 .* the cluster has 2"),
        ("tune: {cpus_per_trial: 3}", r"tune: a trial asks for 3 CPU / 0 GPU, the cluster has 2 / 0"),
    ],
)
def test_a_preset_the_cluster_cannot_hold_fails_before_the_first_stage(
    ray_session, cifar_parquet, tmp_path, section, words
):
    """The teacher's fit and a trial are checked against the live cluster (2 CPUs here)
    before anything is prepared: one line naming the preset's section, exit 2."""
    preset = tmp_path / "big.yaml"
    preset.write_text(f"base: demo\n{section}\n")
    out = tmp_path / "run"
    rc, _, err = cli("run", "--preset", str(preset), "--source", str(cifar_parquet), "--out", str(out))
    assert rc == 2 and re.search(rf"--preset {re.escape(str(preset))}: {words}", err), err
    assert len(err.strip().splitlines()) == 1
    assert not [p.name for p in out.glob("*") if p.name != "logs"]  # no stage began (Ray's log file aside)
