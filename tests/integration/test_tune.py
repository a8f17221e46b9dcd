"""`effray tune` + `effray report` on local Ray with tiny real data: trials, tracking, the
Pareto scheduler, files. (A search killed and resumed is test_run_resume.py's, under
`effray run`; a trial on a killed node resuming, test_multinode.py's.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import trial_rows

from effray.cli import main
from effray.train.checkpoint import read_payload

SPACE = {
    "prune_kind": {"choice": ["unstructured", "structured"]},
    "prune_rate": {"uniform": [0.3, 0.6]},
    "bits": {"choice": [4, 8]},
    "kd_alpha": {"choice": [0.0, 0.5]},
    "finetune_epochs": 1,
    "finetune_batch_size": 64,
    "calib_batches": 2,
    "int8": False,
}


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def test_invalid_space_fails_before_any_trial(ray_session, tiny_cifar, teacher, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"bits": {"choice": [4, 9]}}))
    code = main(
        [
            "tune",
            "--teacher",
            str(teacher),
            "--data",
            str(tiny_cifar),
            "--space",
            str(bad),
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "bad",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bits=9" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad").exists()


# ------------------------------------------------------------------ tracking, workers per trial


def _wandb_runs(root: Path) -> list[dict]:
    """Every offline run below ``root``; ``dir`` is the ``wandb`` dir holding it, ``run_dir`` its own."""
    from helpers import read_wandb_run

    return [
        {**read_wandb_run(f), "dir": f.parent.parent, "run_dir": f.parent}
        for f in sorted(root.rglob("offline-run-*/run-*.wandb"))
    ]


@pytest.mark.slow
def test_tracked_search_is_one_wandb_run_per_trial_plus_a_summary(ray_session, tiny_cifar, teacher, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "finetune_epochs": 2}))
    storage = tmp_path / "runs"
    code = main(
        [
            "tune",
            "--teacher",
            str(teacher),
            "--data",
            str(tiny_cifar),
            "--space",
            str(space),
            "--num-samples",
            "2",
            "--scheduler",
            "none",
            "--cpus-per-trial",
            "0.5",
            "--deploy",
            "off",  # the deployed latency is the pareto search's to check
            "--robust-images",
            "0",  # corruption robustness too
            "--storage",
            str(storage),
            "--name",
            "tracked",
            "--wandb-mode",
            "offline",
            "--wandb-project",
            "effray-tests",
            "--no-share-data",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["shared_data"] is False  # each trial streamed its epochs through its own Ray Data pipeline
    experiment = storage / "tracked"
    assert result["finished"] == 2 and result["wandb"]["mode"] == "offline" and result["wandb"]["group"] == "tracked"

    import wandb

    wandb.teardown()  # the summary run was this process's: its offline log is flushed when wandb's service stops
    runs = _wandb_runs(experiment)
    assert all(str(r["dir"]).startswith(str(experiment)) for r in runs)  # offline files live in the experiment
    trials = [r for r in runs if r["job_type"] == "trial"]
    summaries = [r for r in runs if r["job_type"] == "summary"]
    assert len(trials) == 2 and len(summaries) == 1 and len(runs) == 3
    assert {r["group"] for r in runs} == {"tracked"}
    assert len({r["id"] for r in runs}) == 3 and summaries[0]["id"] == result["wandb"]["summary_run_id"]
    results = trial_rows(experiment)
    for run in trials:
        trial_dir = run["dir"].parent
        assert trial_dir.name == f"trial_{run['config']['trial_id']}" and trial_dir.name in results
        assert run["config"]["bits"] in (4, 8) and run["config"]["finetune_epochs"] == 2  # the trial's CompressConfig
        epochs = [h["epoch"] for h in run["history"] if "val_accuracy" in h and "bytes" not in h]
        assert epochs == [1, 2]
        final = next(r for r in results[trial_dir.name] if r.get("final"))
        assert (
            run["summary"]["accuracy"] == pytest.approx(final["accuracy"]) and run["summary"]["bytes"] == final["bytes"]
        )
        assert run["exit_code"] == 0
    summary = summaries[0]
    fields = summary["summary"]
    assert fields["results/_type"] == "table-file" and fields["pareto/_type"] == "image-file"
    files = summary["run_dir"] / "files"
    logged = json.loads((files / fields["results/path"]).read_text())
    assert len(logged["data"]) == 2 and "accuracy" in logged["columns"]
    assert (files / fields["pareto/path"]).read_bytes()[:4] == b"\x89PNG"
    assert fields["trials"] == 2
    table = pd.read_parquet(experiment / "report" / "results.parquet")
    assert summary["summary"]["best_accuracy"] == pytest.approx(table["accuracy"].max())
    assert summary["summary"]["best/trial_id"] == table.iloc[0]["trial_id"]
    assert summary["exit_code"] == 0 and (experiment / "report" / "pareto.png").is_file()


def test_workers_per_trial_that_cannot_fit_fails_in_one_line(ray_session, tiny_cifar, teacher, tmp_path, capsys):
    code = main(
        [
            "tune",
            "--teacher",
            str(teacher),
            "--data",
            str(tiny_cifar),
            "--space",
            str(_space(tmp_path)),
            "--workers-per-trial",
            "4",
            "--cpus-per-trial",
            "2",
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "toobig",
            "--no-wandb",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and "--workers-per-trial 4" in err and "needs 3.01 CPUs" in err and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "runs" / "toobig").exists()


@pytest.mark.slow
def test_workers_per_trial_runs_each_trial_as_a_ray_train_run(ray_session, tiny_cifar, teacher, tmp_path, capsys):
    """--workers-per-trial 2: the trial drives a 2-worker TorchTrainer (0.45 CPU each), whose
    epoch reports reach Tune, then reports the measured artifact as its checkpoint."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "finetune_epochs": 2}))
    storage = tmp_path / "runs"
    code = main(
        [
            "tune",
            "--teacher",
            str(teacher),
            "--data",
            str(tiny_cifar),
            "--space",
            str(space),
            "--num-samples",
            "1",
            "--scheduler",
            "none",
            "--workers-per-trial",
            "2",
            "--cpus-per-trial",
            "0.9",
            "--robust-images",
            "8",
            "--max-corruption-drop",
            "100",  # never binding: rank 0 scores the corrupted images after every epoch
            "--data-cpus",
            "1",
            "--storage",
            str(storage),
            "--name",
            "ddp",
            "--wandb-mode",
            "offline",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finished"] == 1 and result["workers_per_trial"] == 2
    experiment = storage / "ddp"
    ((trial_dir, rows),) = trial_rows(experiment).items()
    trial_id = trial_dir.removeprefix("trial_")
    # the trial's own Ray Train run: deterministic name, stored under the trial
    assert (experiment / trial_dir / f"ddp-{trial_id}").is_dir()
    epochs = [r for r in rows if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["val_accuracy"] <= 1 for r in epochs)
    assert all(r["val_count"] == 60 for r in epochs)  # all-reduced validation over both workers: every row once
    assert all(0 <= r["val_worst_class_recall"] <= r["val_accuracy"] for r in epochs)  # what a tail floor reads
    assert all(0 <= r["val_ece_scaled"] <= 1 for r in epochs)  # and --max-ece's ceiling
    assert all(0 <= r["val_corruption_accuracy"] <= 1 for r in epochs)  # --max-corruption-drop's floor
    workers = next(r for r in rows if r.get("finetuned"))
    assert (
        workers["world"] == 2 and workers["val_accuracy"] == workers["final_val_accuracy"]
    )  # Tune's metric in every row
    finals = [r for r in rows if r.get("final")]
    assert len(finals) == 1 and finals[0]["epoch"] == 3 and finals[0]["bytes"] > 0
    # rank 0 measured its final-form weights each epoch: the last is the saved artifact's size
    assert epochs[-1]["bytes_from"] == "weights" and epochs[-1]["predicted_bytes"] == finals[0]["bytes"]
    # the artifact and its deployed export (--deploy auto: exported, parity-checked and timed per trial)
    assert sorted(os.listdir(experiment / trial_dir / finals[0]["checkpoint_dir_name"])) == ["export", "model.pt"]
    assert not (experiment / trial_dir / "artifact").exists()
    (run,) = [r for r in _wandb_runs(experiment) if r["job_type"] == "trial"]
    assert run["group"] == "ddp" and run["exit_code"] == 0 and run["config"]["workers_per_trial"] == 2
    assert [h["epoch"] for h in run["history"] if "train_loss" in h] == [1, 2]


# ------------------------------------------------------------------ the pareto scheduler, budgets, shared data

PARETO_SPACE = {
    "prune_kind": "unstructured",
    "prune_rate": 0.5,
    "bits": {"grid": [4, 8, 32]},
    # 5.0 diverges: those trials fall to chance, dominated by a cheaper trial that learned
    "finetune_lr": {"grid": [0.01, 5.0]},
    "finetune_epochs": 3,
    "finetune_batch_size": 64,
    "calib_batches": 2,
    "int8": False,
}


@pytest.mark.slow
def test_pareto_search_stops_only_dominated_trials_within_budget(ray_session, tiny_cifar, teacher, tmp_path, capsys):
    """Grid of 6 configs under a size budget: the fp32 ones never run (predicted over
    budget), the diverging trials are stopped at rung 1 only when dominated by a cheaper,
    more accurate one, every trial that reached its last epoch was measured, predictions
    match the saved artifacts, and the report marks the stopped trials."""
    space = tmp_path / "pareto.yaml"
    space.write_text(yaml.safe_dump(PARETO_SPACE))
    storage = tmp_path / "runs"
    code = main(
        [
            "tune",
            "--teacher",
            str(teacher),
            "--data",
            str(tiny_cifar),
            "--space",
            str(space),
            "--search",
            "grid",
            "--num-samples",
            "1",
            "--scheduler",
            "pareto",
            "--grace-period",
            "1",
            "--reduction-factor",
            "3",
            "--max-size-kb",
            "200",
            "--max-corruption-drop",
            "100",  # a floor below zero: scored every epoch, never binding
            "--storage",
            str(storage),
            "--name",
            "pareto",
            "--no-wandb",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["shared_data"] is True
    experiment = storage / "pareto"
    results = trial_rows(experiment)
    configs = {t: json.loads((experiment / t / "params.json").read_text()) for t in results}
    assert len(results) == 4 and summary["trials"] == 4  # the two fp32 configs were dropped before they ran
    assert all(c["compress"]["bits"] != 32 and c["predicted"]["bytes"] <= 200 * 1024 for c in configs.values())
    stopped = json.loads((experiment / "stopped.json").read_text())
    assert stopped, "no trial was stopped"
    teacher_scores = json.loads((experiment / "teacher.json").read_text())  # the baseline, on the same corrupted images
    assert 0 < teacher_scores["corruption_accuracy"] <= 1 and 0 <= teacher_scores["ece"] <= 1
    assert teacher_scores["temperature"] > 0 and teacher_scores["nll_scaled"] <= teacher_scores["nll"] + 1e-6
    for trial, why in stopped.items():
        rows = results[f"trial_{trial}"]
        assert not any(r.get("final") for r in rows) and rows[-1]["epoch"] == why["rung"] < 3
        assert configs[f"trial_{trial}"]["compress"]["finetune_lr"] == 5.0
        at_rung = rows[-1]
        assert 0 <= at_rung["val_worst_class_recall"] <= at_rung["val_accuracy"]  # in-process trials report it too
        assert 0 <= at_rung["val_ece_scaled"] <= 1 and 0 <= at_rung["val_corruption_accuracy"] <= 1
        assert why["dominated_by"]
        for other in why["dominated_by"]:  # really dominated, at the same rung, beyond the margin
            theirs = next(r for r in results[f"trial_{other}"] if r["epoch"] == why["rung"])
            assert theirs["val_accuracy"] >= at_rung["val_accuracy"] + 0.005
            assert theirs["predicted_bytes"] <= at_rung["predicted_bytes"]
    for trial, rows in results.items():
        if trial.removeprefix("trial_") in stopped:
            continue
        final = [r for r in rows if r.get("final")]
        assert len(final) == 1  # never stopped on its last epoch, always measured
        f = final[0]
        assert f["macs"] == f["predicted_macs"] and f["params"] == f["predicted_params"]
        # QAT from epoch 1 on: from then the rungs rank by the weights' own size, and the last
        # epoch's is the saved file's, to the byte
        last = next(r for r in rows if r["epoch"] == 3 and not r.get("final"))
        assert [r["bytes_from"] for r in rows if not r.get("final")] == ["config", "weights", "weights"]
        assert last["predicted_bytes"] == f["bytes"]
        # before training: what fine-tuning leaves in the weights decides LZMA's ratio on the
        # codes, and this tiny teacher is far from converged, so its 8-bit fine-tunes land
        # further from the prediction than its 4-bit ones (bench/cost_prediction.py measures a
        # trained teacher). A diverged fine-tune (a 5.0 trial that reached rung 1 alone and
        # went on) is anyone's guess
        if configs[trial]["compress"]["finetune_lr"] == 0.01:
            slack = 0.02 if configs[trial]["compress"]["bits"] == 4 else 0.10
            assert abs(f["bytes"] - f["predicted_bytes"]) <= slack * f["bytes"]
        assert f["setup_s"] > 0 and f["trial_s"] > f["setup_s"]
        # beyond accuracy, on the final artifact: per-class scores, calibration, corruption robustness
        assert all(0 <= f[k] <= 1 for k in ("macro_f1", "worst_class_recall", "ece", "corruption_accuracy"))
        assert f["worst_class_recall"] <= f["accuracy"]
        assert f["temperature"] > 0 and 0 <= f["ece_scaled"] <= 1  # post-hoc temperature scaling, fitted on val
        assert f["nll"] > 0 or configs[trial]["compress"]["finetune_lr"] == 5.0  # a diverged model's logits are NaN
        assert f["ratio_corruption_accuracy_drop_points"] == pytest.approx(
            100 * (teacher_scores["corruption_accuracy"] - f["corruption_accuracy"])
        )
        # --deploy auto: the final artifact exported (ONNX here), checked, and timed beside the
        # teacher's fp32 file on the same runtime; latency_ms is that file's (the eager module's kept apart)
        if "deploy_error" not in f:  # a diverged fine-tune's file may fail its parity check: the row says why
            assert f["runtime"] == teacher_scores["runtime"] == "onnxruntime" and f["latency_ms"] == f["latency_ms_b1"]
            assert f["speedup_b1"] == pytest.approx(f["teacher_latency_ms_b1"] / f["latency_ms_b1"])
            assert f["slower_than_teacher"] == (f["speedup_b1"] < 1 or f["speedup_bN"] < 1)
            assert f["eager_latency_ms"] > 0 and f["batch_N"] == teacher_scores["batch_N"] == 256
    assert main(["report", "--experiment", str(experiment), "--max-size-kb", "200", "--objective", "robustness"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finals = [r for rows in results.values() for r in rows if r.get("final")]
    assert report["budget_pick"]["corruption_accuracy"] == max(r["corruption_accuracy"] for r in finals)
    table = pd.read_parquet(experiment / "report" / "results.parquet")
    assert {"macro_f1", "ece", "corruption_accuracy", "pareto_robust_bytes"} <= set(table)
    assert all((experiment / "report" / name).is_file() for name in ("results.csv", "report.md", "pareto.png"))
    assert (
        table["artifact"].map(os.path.isfile).all() and (table["bytes"] < teacher_scores["bytes"]).all()
    )  # packed < fp32
    assert report["stopped_early"] == len(stopped) and report["hypervolume"] > 0
    for _, row in table.iterrows():  # each trial's artifact records the temperature its row reports
        assert read_payload(row["artifact"])["temperature"] == row["temperature"]
    md = (experiment / "report" / "report.md").read_text()
    assert "## Calibration: post-hoc temperature scaling" in md and "| teacher (fp32) | " in md.split("## Calib")[1]
    assert "Hypervolume" in md and "Ended before their final measurement" in md
    assert all(t in md for t in stopped)
