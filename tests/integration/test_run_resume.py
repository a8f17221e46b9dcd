"""``effray run`` killed mid-search and run again: the real CLI as a driver process on the
session's Ray, killed with SIGKILL (its whole process group) once the search has a trial
checkpoint. The re-run continues from there: the dataset, the clean report and the teacher
are not redone, the search's trials are restored rather than started again, and it ends
with the whole front exported. (A re-run of the export stage keeping what it exported is
test_export.py's, in-process: nothing here kills a run mid-export any more. A training
run killed mid-fit resuming from its checkpoint is ``effray train``'s, tested in
test_train.py and test_multinode.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

EFFRAY = Path(sys.executable).parent / "effray"
SPACE = """prune_kind: unstructured
prune_rate: 0.5
bits: {grid: [4, 8]}
kd_alpha: 0.7
finetune_epochs: 2
finetune_lr: 0.01
"""


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(EFFRAY), *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, settle_s: float, timeout: float = 240) -> None:
    """SIGKILL the driver's process group ``settle_s`` after ``ready()`` first holds (time for
    Ray to record the checkpoint that made it true)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no kill point within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    time.sleep(settle_s)
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _history(out: Path) -> list[dict]:
    path = out / "teacher" / "teacher" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _teacher_checkpoints(out: Path) -> list[Path]:
    return sorted((out / "teacher" / "teacher").glob("epoch-*"))


def _trial_checkpoints(out: Path) -> list[Path]:
    return sorted((out / "compress").glob("trial_*/checkpoint_*"))


def _search_saved_after_a_checkpoint(out: Path) -> bool:
    """A trial has a checkpoint and Tune's experiment state was saved after it (every
    second here): a kill now leaves a search that restores, whatever the machine's load."""
    checkpoints, states = _trial_checkpoints(out), list((out / "compress").glob("experiment_state-*.json"))
    return bool(checkpoints and states) and max(p.stat().st_mtime for p in states) > min(p.stat().st_mtime for p in checkpoints)


@pytest.mark.slow
def test_a_run_killed_in_the_search_resumes_it_and_redoes_no_earlier_stage(ray_session, cifar_parquet, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"base: demo\nprepare: {{limit: 600}}\ntrain: {{epochs: 2, batch_size: 64}}\n"
                      f"tune: {{space: {tmp_path / 'space.yaml'}, robust_images: 20}}\n")  # fmt: skip
    out = tmp_path / "run"
    args = ["run", "--preset", str(preset), "--source", str(cifar_parquet), "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "WANDB_MODE": "offline",
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # fmt: skip

    # 1: killed while the search runs, after a trial's first checkpoint
    first = _start(args, tmp_path / "first.log", env)
    _kill_when(first, lambda: _search_saved_after_a_checkpoint(out), tmp_path / "first.log", settle_s=0.5)
    meta, report = out / "data" / "meta.json", out / "clean" / "clean_report.json"
    stamps = {p: p.stat().st_mtime_ns for p in (meta, report, *_teacher_checkpoints(out))}
    history = _history(out)
    assert [r["epoch"] for r in history] == [1, 2] and not (out / "compress" / "report").exists()

    # 2: runs to the end
    second = subprocess.run([str(EFFRAY), *args], capture_output=True, text=True, env=env, timeout=600)
    said = f"\n{second.stdout[-3000:]}\n{second.stderr[-2000:]}"  # what the re-run printed, for every assert below
    assert second.returncode == 0, said
    summary = json.loads([ln for ln in second.stdout.splitlines() if ln.startswith("{")][-1])
    printed = second.stdout + second.stderr
    assert "kept from the last run" in printed and "nothing to train" in printed, said  # the clean report and the teacher kept
    assert summary["trials"] == 2 and _history(out) == history, said
    assert len(list((out / "compress").glob("trial_*"))) == 2, said  # the killed search's trials resumed, none started anew
    assert {Path(e["dir"]).name for e in summary["exports"].values()} == {p.name for p in (out / "export").iterdir() if p.is_dir()}
    assert all((Path(e["dir"]) / "deploy.json").is_file() for e in summary["exports"].values()), said
    assert "effray serve --model" in second.stdout  # the summary names the pick's serve command
    assert {p: p.stat().st_mtime_ns for p in (meta, report, *_teacher_checkpoints(out))} == stamps
