"""``bench/gpu_check.sh --dry-run``: the GPU check is whole on a CPU machine. Every effray
command in it parses and validates (``effray --dry-run``: an unknown or misspelt flag
exits 2 and fails the script), the CUDA tests are collected, and nothing runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_parses_every_command(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "[gpu_check] dry run complete: every command parsed"
    steps = [ln for ln in lines if ln.startswith("[gpu_check] ok (dry run)")]
    assert len(steps) == 14  # tests, prepare, 4 DDP, 2 pipeline, 2 ingest, compress, tune, gan, airbench94
    configs = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert configs["pipeline_1f1b"]["config"]["pipeline_schedule"] == "1f1b"
    assert configs["ingest_gpu"]["config"]["data"]["augment_on"] == "gpu"
    assert all(c["config"]["gpus_per_worker"] == 1 for name, c in configs.items() if c["command"] == "train")


def test_a_misspelt_flag_fails_the_dry_run():
    from effray.cli import main

    assert main(["--dry-run", "train", "--data", "d", "--storage", "/tmp/s"]) == 0
    try:
        main(["--dry-run", "train", "--data", "d", "--gpus-per-wroker", "1"])
    except SystemExit as exc:  # argparse: exit status 2
        assert exc.code == 2
    else:
        raise AssertionError("an unknown flag was accepted")
