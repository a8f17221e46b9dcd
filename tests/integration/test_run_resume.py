"""``effray run`` killed mid-search and run again: the real CLI as a driver process on the
session's Ray, killed with SIGKILL (its whole process group) once one of the search's two
trials has finished and Tune's saved state holds it, while the other is still training.
The re-run continues from there: the dataset, the clean report and the teacher are not
redone, the finished trial is not run again, the other goes on from its checkpoint (the
re-run measures it and reports no epoch 1 again), and it ends with the whole front
exported, printing only effray's lines. (A re-run of the export stage keeping what
it exported is test_export.py's, in-process. A training run killed mid-fit resuming from
its checkpoint is ``effray train``'s, in test_train.py and test_multinode.py; a trial on a
killed node resuming from its checkpoint is test_multinode.py's.)"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers import cli, trial_rows

EFFRAY = Path(sys.executable).parent / "effray"
# two trials side by side: the 1-epoch one finishes (its final measurement takes seconds)
# while the 10-epoch one still trains or measures (with 6 a quiet machine sometimes
# finished both before the kill point)
SPACE = """prune_kind: unstructured
prune_rate: 0.5
bits: 4
kd_alpha: 0.7
finetune_epochs: {grid: [1, 10]}
finetune_lr: 0.01
"""


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(EFFRAY), *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 240) -> None:
    """SIGKILL the driver's process group as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, (
            f"the run ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no kill point within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _history(out: Path) -> list[dict]:
    path = out / "teacher" / "teacher" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _teacher_checkpoints(out: Path) -> list[Path]:
    return sorted((out / "teacher" / "teacher").glob("epoch-*"))


def _finals(experiment: Path) -> dict[str, list[float]]:
    """Trial directory name -> the timestamps of every final measurement it reported."""
    return {
        t: [r["timestamp"] for r in rows if r.get("final") and not r.get("done")]
        for t, rows in trial_rows(experiment).items()
    }


def _terminated(experiment: Path) -> set[str]:
    """Directory names (``trial_<id>``) of the trials Tune's saved experiment state holds as terminated."""
    from ray.tune import ExperimentAnalysis

    try:
        return {f"trial_{t.trial_id}" for t in ExperimentAnalysis(str(experiment)).trials if t.status == "TERMINATED"}
    except Exception:  # no state saved yet, or caught mid-write
        return set()


def _kill_point(experiment: Path) -> dict[str, list[float]] | None:
    """The trials' finals once one trial has measured its final and Tune's saved state
    (every second here) holds it terminated, while the other still trains with a checkpoint
    older than that save: a kill then leaves one trial to skip and one to restore."""
    finals = _finals(experiment)
    finished = {t for t, stamps in finals.items() if stamps}
    if len(finals) != 2 or len(finished) != 1 or not finished <= _terminated(experiment):
        return None
    (running,) = set(finals) - finished
    states, checkpoints = (
        list(experiment.glob("experiment_state-*.json")),
        list((experiment / running).glob("checkpoint_*")),
    )
    if not (states and checkpoints) or max(p.stat().st_mtime for p in states) <= min(
        p.stat().st_mtime for p in checkpoints
    ):
        return None
    return finals


def _artifact(experiment: Path, trial: str) -> str:
    return str(sorted(experiment.glob(f"trial_{trial}/checkpoint_*/model.pt"))[-1])


@pytest.mark.slow
def test_a_run_killed_in_the_search_resumes_it_and_redoes_no_earlier_stage(ray_session, cifar_parquet, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        f"base: demo\nprepare: {{limit: 660}}\ntrain: {{epochs: 2, batch_size: 64}}\n"
        f"tune: {{space: {tmp_path / 'space.yaml'}, robust_images: 20, scheduler: none,"
        " limits: {max_drop: 50, max_ece: 0.9}}\n"
    )
    out = tmp_path / "run"
    args = ["run", "--preset", str(preset), "--source", str(cifar_parquet), "--out", str(out)]
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "WANDB_MODE": "offline",
        "TUNE_GLOBAL_CHECKPOINT_S": "1",
    }

    # 1: killed while the search runs: one trial finished and recorded, the other still training
    experiment, seen = out / "compress", {}

    def ready() -> bool:
        seen.update(_kill_point(experiment) or {})
        return bool(seen)

    first = _start(args, tmp_path / "first.log", env)
    _kill_when(first, ready, tmp_path / "first.log")
    finished = {t: stamps for t, stamps in seen.items() if stamps}
    (running,) = set(seen) - set(finished)
    meta, report = out / "data" / "meta.json", out / "clean" / "clean_report.json"
    stamps = {p: p.stat().st_mtime_ns for p in (meta, report, *_teacher_checkpoints(out))}
    history = _history(out)
    assert [r["epoch"] for r in history] == [1, 2] and not (experiment / "report").exists()

    # 2: runs to the end
    rerun_at = math.ceil(time.time())  # the rows it reports carry this timestamp or later
    second = subprocess.run([str(EFFRAY), *args], capture_output=True, text=True, env=env, timeout=600)
    said = f"\n{second.stdout[-3000:]}\n{second.stderr[-2000:]}"  # what the re-run printed, for every assert below
    assert second.returncode == 0, said
    summary = json.loads([ln for ln in second.stdout.splitlines() if ln.startswith("{")][-1])
    printed = second.stdout + second.stderr
    # quiet: effray's lines, its bars and its table; Ray's own output went to the log file it names
    assert not second.stderr.strip() and all(
        re.match(r"(\[effray|\{|\s|\w+: +\d+%)", ln) for ln in second.stdout.splitlines() if ln.strip()
    ), said
    log = Path(second.stdout.split("Ray's own output: ", 1)[1].split(" (--verbose", 1)[0])
    assert log.parent == out / "logs" and log.stat().st_size > 0, said
    assert "kept from the last run" in printed and "nothing to train" in printed, (
        said
    )  # the clean report and the teacher kept
    assert summary["trials"] == 2 and _history(out) == history, said
    assert len(list(experiment.glob("trial_*"))) == 2, said  # the killed search's trials resumed, none started anew
    after = _finals(experiment)
    assert sorted(map(len, after.values())) == [1, 1], f"{after}{said}"  # each trial measured once
    assert all(after[t] == stamps for t, stamps in finished.items()), f"{after}{said}"  # the finished one not run again
    # the other went on from its checkpoint (its epochs take ~1 s and its final measurement
    # several, so the kill may find it past its last epoch): the re-run measured it and
    # reported no epoch 1 again, as a trial started anew would
    rows = [(r["epoch"], r["timestamp"], bool(r.get("final"))) for r in trial_rows(experiment)[running]]
    again = [epoch for epoch, stamp, final in rows if stamp >= rerun_at and not final]
    assert after[running][0] >= rerun_at and 1 not in again, f"{rows}{said}"
    assert {Path(e["dir"]).name for e in summary["exports"].values()} == {
        p.name for p in (out / "export").iterdir() if p.is_dir()
    }
    assert all((Path(e["dir"]) / "deploy.json").is_file() for e in summary["exports"].values()), said
    assert "effray serve --model" in second.stdout  # the summary names the pick's serve command
    # the front's latencies: each exported file on ONNX Runtime against the teacher's file there
    assert "x b1" in second.stdout and "latency: the exported files on onnxruntime" in second.stdout, said
    assert {p: p.stat().st_mtime_ns for p in (meta, report, *_teacher_checkpoints(out))} == stamps
    # chosen on val, estimated once on the 66 images the default --test-fraction carved out of the 660
    test = summary["test"]
    assert (
        test["images"] == 66 and test["selected_on"] == "val" and {f"trial_{t}" for t in test["front"]} <= set(after)
    ), said
    assert "[effray run] test split (66 images, never trained on or chosen by" in second.stdout, said
    for scores in (test["teacher"], *test["front"].values()):
        assert scores["accuracy_low"] <= scores["accuracy"] <= scores["accuracy_high"], test
    # the figures `effray evaluate` gives each artifact on that split, through its own batches
    for trial, scores in test["front"].items():
        args = ("--checkpoint", _artifact(experiment, trial), "--data", str(out / "data"), "--split", "test")
        rc, evaluated, err = cli("evaluate", *args, "--tta", "0")
        assert rc == 0 and evaluated["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-9), err
    assert "## Held-out test split" in Path(summary["report"]).read_text()
    # --max-drop and a tail limit: the pick is the smallest model within both on val, against the teacher's val scores
    table = pd.read_parquet(Path(summary["report"]).with_name("results.parquet"))
    teacher = json.loads((experiment / "teacher.json").read_text())
    within = table[(table["accuracy"] >= teacher["accuracy"] - 0.5) & (table["ece_scaled"] <= 0.9)]
    cheapest = within.sort_values(["bytes", "accuracy"], ascending=[True, False]).iloc[0]["trial_id"]
    assert (
        summary["budget_pick"]["trial_id"] == cheapest
        and summary["limits"] == "accuracy drop ≤ 50 pt, ECE (after T) ≤ 0.9"
    )
    assert "* the cheapest in bytes within accuracy drop ≤ 50 pt" in second.stdout and cheapest in test["front"], said
