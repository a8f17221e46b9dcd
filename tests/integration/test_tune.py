"""`effray tune` + `effray report` on local Ray with tiny real data: trials, resume, files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from effray.cli import main

ROOT = Path(__file__).resolve().parents[2]
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


def _finals(experiment: Path) -> dict[str, list[float]]:
    """trial dir -> timestamps of its final reports (a trial run twice would have two)."""
    out = {}
    for f in experiment.rglob("result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip().startswith("{")]
        stamps = [r["timestamp"] for r in rows if r.get("final") and not r.get("done")]
        if stamps:
            out[str(f.parent)] = stamps
    return out


def test_invalid_space_fails_before_any_trial(ray_session, tiny_cifar, teacher, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"bits": {"choice": [4, 9]}}))
    code = main(["tune", "--teacher", str(teacher), "--data", str(tiny_cifar), "--space", str(bad),
                 "--storage", str(tmp_path / "runs"), "--name", "bad"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "bits=9" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slow
def test_killed_search_resumes_then_reports(tiny_cifar, teacher, tmp_path, capsys):
    """A 4-trial search: kill the driver after two trials finished and re-run it (the rest
    run, the two don't), then `effray report` writes every file and picks within budget."""
    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "effray.cli", "tune", "--teacher", str(teacher), "--data", str(tiny_cifar),
           "--space", str(_space(tmp_path)), "--num-samples", "4", "--scheduler", "none",
           "--max-concurrent", "1", "--storage", str(storage), "--name", "resume"]  # fmt: skip
    # save the experiment state every second, so a kill right after a trial finishes
    # cannot leave that trial unrecorded
    env = {**os.environ, "RAY_ADDRESS": "", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    experiment = storage / "resume"
    deadline = time.time() + 400
    while time.time() < deadline and len(_finals(experiment)) < 2 and proc.poll() is None:
        time.sleep(0.5)
    before = _finals(experiment)
    time.sleep(5)  # let Tune record those trials as terminated (state saved every second)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(before) >= 2, proc.stderr.read().decode()[-2000:]
    assert len(_finals(experiment)) < 4, "the search finished before it could be killed"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["resumed"] is True and result["finished"] == 4
    after = _finals(experiment)
    assert len(after) == 4
    assert all(len(stamps) == 1 for stamps in after.values())  # no trial reported twice
    for trial, stamps in before.items():
        assert after[trial] == stamps  # finished trials were not run again
    assert main(["report", "--experiment", str(experiment), "--max-size-kb", "1000"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = experiment / "report"
    for name in ("results.parquet", "results.csv", "report.md", "pareto.png"):
        assert (report / name).is_file()
    table = pd.read_parquet(report / "results.parquet")
    assert len(table) == 4 and table["accuracy"].between(0, 1).all()
    assert (table["bytes"] > 0).all() and table["artifact"].map(os.path.isfile).all()
    teacher_bytes = json.loads((experiment / "teacher.json").read_text())["bytes"]
    assert (table["bytes"] < teacher_bytes).all()  # 4/8-bit packed artifacts are smaller than fp32
    assert summary["budget_pick"]["accuracy"] == table[table["bytes"] <= 1000 * 1024]["accuracy"].max()
    # the picked artifact loads like any checkpoint
    assert main(["evaluate", "--checkpoint", summary["budget_pick"]["artifact"], "--data", str(tiny_cifar)]) == 0
