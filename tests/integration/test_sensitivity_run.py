"""`effray sensitivity` on local Ray, through the real CLI on the tiny real-CIFAR teacher: one
row per layer and setting with drops against a baseline that is `effray evaluate`'s score
of the same images, a heat map and a summary; a rerun reuses every finished layer's part
(nothing rewritten, the same table), a lost part is redone alone; a bad flag or teacher
fails in one line with nothing written."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers import cli

from effray.compress.sensitivity_run import COLUMNS, PARQUET, PARTS

LAYERS = ["stem.0", "block1.0", "head.fc1", "head.fc"]  # the convnet's convs and linears, in order
SETTINGS = [("bits", 2.0), ("bits", 8.0), ("unstructured", 0.5), ("structured", 0.5)]


def run(teacher, data, out, *flags):
    return cli(
        "sensitivity",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--out",
        str(out),
        "--bits",
        "2,8",
        "--rates",
        "0.5",
        "--calib-images",
        "64",
        *flags,
    )


def test_sensitivity_rows_baseline_heat_map_and_a_rerun_that_reuses_every_part(tiny_cifar, teacher, tmp_path):
    out = tmp_path / "sens"
    rc, result, err = run(teacher, tiny_cifar, out)
    assert rc == 0, err
    table = pq.read_table(out / PARQUET)
    assert table.column_names == list(COLUMNS)
    rows = table.to_pylist()
    assert [(r["layer"], r["kind"], r["value"]) for r in rows] == [(n, k, v) for n in LAYERS for k, v in SETTINGS]

    # the baseline is the teacher as `effray evaluate` scores the same 60 val images (all of them: 64 asked)
    rc_e, ev, err_e = cli("evaluate", "--checkpoint", str(teacher), "--data", str(tiny_cifar), "--tta", "0")
    assert rc_e == 0, err_e
    base = result["baseline"]
    assert base["count"] == ev["count"] == 60
    assert base["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12) and base["accuracy"] > 0.15
    assert base["loss"] == pytest.approx(ev["loss"], rel=1e-5)

    skipped = [r for r in rows if r["skipped_reason"]]
    assert [(r["layer"], r["kind"]) for r in skipped] == [("head.fc", "structured")]  # the classifier keeps its classes
    assert "classifier" in skipped[0]["skipped_reason"] and skipped[0]["accuracy"] is None
    measured = [r for r in rows if not r["skipped_reason"]]
    for r in measured:
        assert r["accuracy_drop"] == pytest.approx(base["accuracy"] - r["accuracy"], abs=1e-12)
        assert r["loss_increase"] == pytest.approx(r["loss"] - base["loss"], abs=1e-12)
        assert round(r["accuracy"] * 60) == pytest.approx(r["accuracy"] * 60, abs=1e-6)  # a count of the 60
    by = {(r["layer"], r["kind"], r["value"]): r for r in rows}
    assert by[("block1.0", "bits", 2.0)]["params"] == by[("block1.0", "structured", 0.5)]["params"] == 32 * 16 * 9
    assert by[("block1.0", "structured", 0.5)]["model_params"] < by[("block1.0", "bits", 2.0)]["model_params"]
    assert sum(r["accuracy_drop"] for r in measured if r["value"] == 2.0) > sum(
        r["accuracy_drop"] for r in measured if r["value"] == 8.0
    )

    assert result["layers"] == 4 and result["probes"] == 15 and result["skipped"] == 1
    assert result["tasks_run"] == 5 and result["parts_reused"] == 0  # the baseline and one task per layer
    assert set(result["worst"]) == set(LAYERS)
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "sensitivity.json").read_text())["baseline"] == base

    parts = sorted((out / PARTS).glob("*.json"))
    assert len(parts) == 5
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    rc, again, err = run(teacher, tiny_cifar, out)
    assert rc == 0, err
    assert again["tasks_run"] == 0 and again["parts_reused"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / PARTS).glob("*.json"))} == mtimes
    assert pq.read_table(out / PARQUET).equals(table) and again["baseline"] == base

    lost = next(p for p in parts if json.loads(p.read_text()).get("layer") == "block1.0")
    lost.unlink()
    rc, redone, err = run(teacher, tiny_cifar, out)
    assert rc == 0, err
    assert redone["tasks_run"] == 1 and redone["parts_reused"] == 4
    again_rows = pq.read_table(out / PARQUET).to_pylist()
    assert [(r["layer"], r["kind"], r["value"], r["skipped_reason"]) for r in again_rows] == [
        (r["layer"], r["kind"], r["value"], r["skipped_reason"]) for r in rows
    ]
    for new, old in zip(again_rows, rows):
        assert new["accuracy"] == pytest.approx(old["accuracy"]) and new["loss"] == pytest.approx(old["loss"])


def test_a_bad_flag_or_teacher_fails_in_one_line_and_writes_nothing(tiny_cifar, teacher, tmp_path):
    out = tmp_path / "bad"
    for flags, message in (
        (("--bits", "1,8"), "--bits must be"),
        (("--rates", "1.5"), "--rates must be"),
        (("--teacher", str(tmp_path / "missing")), "no checkpoint"),
    ):
        rc, result, err = run(teacher, tiny_cifar, out, *flags)
        lines = err.strip().splitlines()
        assert rc == 2 and result is None
        assert len(lines) == 1 and lines[0].startswith("effray: error:") and message in lines[0], err
        assert not out.exists()
