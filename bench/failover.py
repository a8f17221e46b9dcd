"""Failover: from a node's death to training progressing again, fixed-size against
elastic, and the work each loses, on real local nodes (:mod:`effray.local_cluster`).

    .venv/bin/python bench/failover.py [--rows 20000] [--epochs 6] [--kill-in-epoch 3]

Both runs are `effray train` (DDP, convnet) from their own driver process, on 1-CPU nodes
offering ``trainer=1`` (workers go only there; one more node without it runs Ray Data's
tasks). Half-way through epoch ``--kill-in-epoch`` the node of rank 1 gets SIGKILL:

* **fixed** (``--workers 2``, 2 trainer nodes): Ray Train restarts the worker group from
  the newest registered checkpoint once a replacement node is up (started right after the
  kill here; on a cloud the autoscaler takes minutes, not the seconds of a local node);
* **elastic** (``--workers 2-3``, 3 trainer nodes): it goes on with the 2 left, no
  replacement; once with ``--resize-timeout-s 15`` and once with the default 5 (the first
  group after the kill is sized to the dead node, which Ray still counts, and waits that
  long before the run tries again with the size Ray sees then).

Printed per run: seconds from the kill to the restarted run's first step (its first
epoch's end as the history file shows it, less that epoch's training time), how long a
replacement took to join, the epochs redone (completed after the checkpoint it resumed
from) and the steps thrown away (those epochs plus the interrupted part of the current
one), then the elastic/fixed ratio. Ray Train's health check runs every
``--health-check-s``. CPU times: print the capability beside them (2 cores here run 4
nodes, so the seconds are this machine's, the ratio is the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from effray.hardware import cpu_summary
from effray.local_cluster import LocalCluster, local_cluster
from effray.train.loop import HISTORY_FILE

ROOT = Path(__file__).resolve().parents[1]


def _registered(run_dir: Path, epoch: int) -> bool:
    """Ray Train's checkpoint manager has registered epoch ``epoch`` (a kill before that resumes earlier)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and f'"epoch-{epoch:04d}-' in snapshot.read_text()


def run_and_kill(
    local: LocalCluster,
    name: str,
    data: str,
    storage: Path,
    workers: str,
    epochs: int,
    kill_in_epoch: int,
    replace: bool,
    flags: tuple[str, ...] = (),
) -> dict:
    """One `effray train` run killed half-way through ``kill_in_epoch``: what it lost and
    how long it took to progress again."""
    run_dir = storage / name
    cmd = [
        sys.executable,
        "-m",
        "effray.cli",
        "train",
        "--data",
        data,
        "--model",
        "convnet",
        "--width",
        "0.5",
        "--batch-size",
        "120",
        "--workers",
        workers,
        "--worker-resources",
        "trainer=1",
        "--cpus-per-worker",
        "1",
        "--data-cpus",
        "1",
        "--augment",
        "flip",
        "--epochs",
        str(epochs),
        "--max-failures",
        "3",
        "--storage",
        str(storage),
        "--name",
        name,
        "--no-wandb",
        *flags,
    ]
    driver = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": local.address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[tuple[dict, float]] = []  # every history row and when it appeared

    def poll() -> None:
        f = run_dir / HISTORY_FILE
        lines = f.read_text().splitlines() if f.is_file() else []
        now = time.time()
        seen.extend((json.loads(ln), now) for ln in lines[len(seen) :] if ln.strip())

    while driver.poll() is None and not (_registered(run_dir, kill_in_epoch - 1) and seen):
        poll()
        time.sleep(0.1)
    poll()
    if driver.poll() is not None:
        raise SystemExit(f"{name}: the run ended before the kill: {driver.stderr.read()[-2000:]}")
    time.sleep(seen[-1][0]["epoch_s"] / 2)  # half-way through the epoch after that checkpoint
    poll()
    victim = seen[-1][0]["nodes"][1]
    killed_at = time.time()
    local.kill(victim)
    joined_s = None
    if replace:
        local.add(trainer=1.0)
        joined_s = time.time() - killed_at
    while driver.poll() is None:
        poll()
        time.sleep(0.1)
    poll()
    out, err = driver.communicate()
    if driver.returncode != 0:
        raise SystemExit(f"{name}: exit {driver.returncode}: {err[-2000:]}")
    before = [(r, t) for r, t in seen if t <= killed_at]
    after = [(r, t) for r, t in seen if t > killed_at and r["attempt"] != before[-1][0]["attempt"]]
    first, first_seen = after[0]
    resumed = int(first["resumed_from"] or 0)
    last_row, last_seen = before[-1]
    steps_per_epoch = last_row["optimizer_steps"] / last_row["epoch"]
    partial = min(1.0, (killed_at - last_seen) / last_row["epoch_s"])  # of the interrupted epoch
    redone = last_row["epoch"] - resumed
    return {
        "run": name,
        "workers": workers,
        "world_before": last_row["world"],
        "world_after": first["world"],
        "to_progress_s": first_seen - first["epoch_s"] - killed_at,
        "replacement_joined_s": joined_s,
        "resumed_from": resumed,
        "epochs_redone": redone,
        "steps_lost": (redone + partial) * steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s_before": last_row["epoch_s"],
        "epoch_s_after": seen[-1][0]["epoch_s"],
        "final_epoch": json.loads(out.strip().splitlines()[-1])["epoch"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parquet", default=str(ROOT.parent / "shared" / "data" / "cifar10-train.parquet"))
    p.add_argument("--rows", type=int, default=20000, help="source rows (90%% train, 10%% validation)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--kill-in-epoch", type=int, default=3, help="SIGKILL a node half-way through this epoch (>= 2)")
    p.add_argument("--health-check-s", type=float, default=1.0, help="Ray Train's worker health-check interval")
    args = p.parse_args()
    if not 2 <= args.kill_in_epoch < args.epochs:
        raise SystemExit("--kill-in-epoch must be >= 2 and < --epochs (a checkpoint before it, epochs after it)")
    from effray.data.prepare import PrepareConfig, prepare

    cpu = f"{cpu_summary()}, {os.cpu_count()} cores"
    print(f"# failover on real local nodes; {cpu}", flush=True)
    with tempfile.TemporaryDirectory(prefix="effray-failover-") as tmp:
        data, storage = f"{tmp}/data", Path(tmp) / "runs"
        # 2 trainer nodes + 1 for Ray Data; the elastic run gets a third trainer
        with local_cluster(
            3, node_resources=lambda i: {"trainer": 1.0} if i < 2 else {}, health_check_s=args.health_check_s
        ) as local:
            prepare(
                PrepareConfig(
                    source=f"parquet:{args.parquet}",
                    out=data,
                    limit=args.rows,
                    val_fraction=0.1,
                    test_fraction=0.0,
                    seed=0,
                )
            )
            runs = [run_and_kill(local, "fixed", data, storage, "2", args.epochs, args.kill_in_epoch, replace=True)]
            for name, timeout in (("elastic", "15"), ("elastic-5", "5")):
                local.add(trainer=1.0)  # back to 3 trainer nodes
                runs.append(
                    run_and_kill(
                        local,
                        name,
                        data,
                        storage,
                        "2-3",
                        args.epochs,
                        args.kill_in_epoch,
                        replace=False,
                        flags=("--resize-timeout-s", timeout),
                    )
                )
            for r in runs:
                print(f"{r['run']}: {r}", flush=True)
    rows = [
        ("world size before -> after", lambda r: f"{r['world_before']} -> {r['world_after']}"),
        ("kill -> training again (s)", lambda r: f"{r['to_progress_s']:.1f}"),
        (
            "  of which a replacement joining (s)",
            lambda r: "-" if r["replacement_joined_s"] is None else f"{r['replacement_joined_s']:.1f}",
        ),
        ("resumed from epoch", lambda r: str(r["resumed_from"])),
        ("epochs redone", lambda r: str(r["epochs_redone"])),
        ("steps lost (of steps/epoch)", lambda r: f"{r['steps_lost']:.1f} (of {r['steps_per_epoch']:g})"),
        ("epoch seconds before -> after", lambda r: f"{r['epoch_s_before']:.1f} -> {r['epoch_s_after']:.1f}"),
        ("finished epoch", lambda r: str(r["final_epoch"])),
    ]
    heads = ("fixed (--workers 2)", "elastic (2-3, timeout 15)", "elastic (2-3, timeout 5)")
    print(f"\n{'':38}" + "".join(f"{h:>27}" for h in heads))
    for label, fmt in rows:
        print(f"{label:38}" + "".join(f"{fmt(r):>27}" for r in runs))
    fixed = runs[0]["to_progress_s"]
    ratios = "  ".join(f"{r['run']}/fixed {r['to_progress_s'] / max(fixed, 1e-9):.2f}x" for r in runs[1:])
    print(f"\ntime from the kill to training again: {ratios}   ({cpu})")


if __name__ == "__main__":
    main()
