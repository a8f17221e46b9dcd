"""effray on a real multi-node Ray cluster (see conftest.py): every stage asserts where its
workers ran (node ids the workers report), not just that it finished; a node is killed
mid-epoch and the run survives it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import cli, trial_rows

from effray.local_cluster import NODE_STORE
from effray.train.loop import HISTORY_FILE

pytestmark = pytest.mark.slow

TRAIN = [
    "--model",
    "convnet",
    "--width",
    "0.25",
    "--batch-size",
    "64",
    "--workers",
    "2",
    "--cpus-per-worker",
    "1",
    "--data-cpus",
    "1",
    "--augment",
    "flip",
    "--no-wandb",
]


def _history(run_dir: Path) -> list[dict]:
    f = run_dir / HISTORY_FILE
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []


def _result(stdout: str) -> dict:
    """effray's JSON line: the last line of its stdout that is one (Ray's log monitor may
    print a dead node's raylet log after it)."""
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise AssertionError(f"no JSON line in: {stdout[-2000:]}")


def _wait_registered(run_dir: Path, epoch: int, driver, timeout_s: float = 300) -> bool:
    """Until Ray Train has registered epoch ``epoch``'s checkpoint (its checkpoint manager's
    snapshot names it), not merely until the files exist: a kill in between resumes earlier."""
    snapshot, name = run_dir / "checkpoint_manager_snapshot.json", f'"epoch-{epoch:04d}-'
    deadline = time.time() + timeout_s
    while time.time() < deadline and driver.poll() is None:
        if snapshot.is_file() and name in snapshot.read_text():
            return True
        time.sleep(0.2)
    return False


def _on_two_worker_nodes(nodes: list[str], cluster) -> None:
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one rank per node
    assert cluster.head not in nodes  # the head has no CPUs: nothing trains there


def _driver(cluster, *args: str):
    """`effray` in its own driver process joined to the cluster (as under `ray job submit`)."""
    import os
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "effray.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": cluster.address},
    )


def test_latency_on_times_on_the_labelled_nodes_and_a_label_no_node_has_fails_in_one_line(
    cluster, tiny_cifar, teacher, tmp_path
):
    """``--latency-on effray_node_1,effray_node_2``: the teacher and a trial's file are timed
    by actors on exactly the two nodes that offer those resources (one set of columns each,
    the first target's unsuffixed); a resource no node offers stops ``tune`` in one line
    before any trial. First in the module: the labelled nodes are all still alive."""
    import shutil

    import ray

    import effray.deploy  # noqa: F401  (registers the probe with the search)
    from effray.search.deployed import DeploySpec, deploy_probe

    targets = ("effray_node_1", "effray_node_2")
    node_of = {t: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(t)) for t in targets}
    assert len(set(node_of.values())) == 2 and cluster.head not in node_of.values()
    probe = deploy_probe(DeploySpec("onnx", targets, 1, 8, 3), str(teacher), str(tiny_cifar), str(tmp_path / "t"))
    try:
        assert all(probe.teacher[f"latency_node@{t}"] == node_of[t] for t in targets), probe.teacher
        trial = tmp_path / "trial"
        shutil.copytree(teacher, trial)
        row = probe.measure(str(trial), str(tiny_cifar))
    finally:
        probe.close()
    assert "deploy_error" not in row and row["runtime"] == "onnxruntime", row
    for t in targets:
        assert row[f"latency_node@{t}"] == node_of[t] and row[f"latency_ms_b1@{t}"] > 0 and row[f"img_s_bN@{t}"] > 0
        assert row[f"speedup_b1@{t}"] == pytest.approx(row[f"teacher_latency_ms_b1@{t}"] / row[f"latency_ms_b1@{t}"])
    assert row["latency_ms_b1"] == row["latency_ms_b1@effray_node_1"] and row["latency_node"] == node_of[targets[0]]
    rc, _, err = cli(
        "tune",
        "--teacher",
        str(teacher),
        "--data",
        str(tiny_cifar),
        "--latency-on",
        "effray_node_1,gpu_box",
        "--search",
        "grid",
        "--robust-images",
        "0",
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "unlabelled",
        "--no-wandb",
    )
    assert rc == 2 and err.count("\n") == 1 and "no node of this cluster offers resource 'gpu_box'" in err, err
    assert not list((tmp_path / "runs" / "unlabelled").glob("trial_*"))  # no trial ran


def test_pipeline_stages_on_two_nodes(cluster, tiny_cifar, tmp_path):
    rc, result, err = cli(
        "train",
        "--data",
        str(tiny_cifar),
        *TRAIN,
        "--epochs",
        "1",
        "--parallel",
        "pipeline",
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--pipeline-schedule",
        "1f1b",
        "--storage",
        str(tmp_path),
        "--name",
        "pipe",
    )
    assert rc == 0, err[-3000:]
    _on_two_worker_nodes(result["nodes"], cluster)  # stage 0 on one node, stage 1 on the other
    assert result["val_count"] == 60


def test_compress_fine_tunes_on_two_nodes_survives_a_worker_death_and_measures_the_file(
    cluster, tiny_cifar, teacher, tmp_path, capsys
):
    """One Ray Train fine-tune on 2 nodes: 50 % unstructured pruning, 4-bit QAT, KD of logits
    and features, 2 epochs (pruned at epoch 0, quantized at epoch 1: DDP is re-prepared
    twice, the feature taps re-hooked on the quantized modules); rank 1 dies in epoch 2 and
    the restart goes on from epoch 1's checkpoint (pruned, not yet quantized, with its
    feature projection). The metrics file agrees with the artifact, and `effray evaluate`
    scores it the same. The stem's 16 channels match block1's 32 through a learned 1x1
    projection (a DDP module of its own), block1 its own directly."""
    out = tmp_path / "artifact"
    rc, printed, err = cli(
        "compress",
        "--teacher",
        str(teacher),
        "--data",
        str(tiny_cifar),
        "--out",
        str(out),
        "--prune-rate",
        "0.5",
        "--bits",
        "4",
        "--kd-alpha",
        "0.5",
        "--kd-temperature",
        "4",
        "--kd-features",
        "stem=block1,block1",
        "--kd-feature-weight",
        "0.5",
        "--finetune-epochs",
        "2",
        "--finetune-batch-size",
        "64",
        "--finetune-lr",
        "0.02",
        "--calib-batches",
        "2",
        "--eval-batch-size",
        "64",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--data-cpus",
        "1",
        "--inject-failure-at-epoch",
        "2",
        "--max-failures",
        "1",
    )
    assert rc == 0, err[-3000:]
    assert printed["workers"] == 2 and printed["out"] == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    finetune = metrics["finetune"]
    _on_two_worker_nodes(finetune["nodes"], cluster)  # reached the driver through Ray Train's report
    assert finetune["world"] == 2 and [e["epoch"] for e in finetune["epochs"]] == [1, 2]
    assert finetune["resumed_from"] == 1  # the restart after the injected death: no epoch twice
    assert finetune["final"]["val_count"] == metrics["eval_images"] == 60  # exact validation: every row once
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt"]

    assert metrics["accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert metrics["bytes"] == (out / "model.pt").stat().st_size == printed["bytes"]
    assert metrics["nonzero_params"] < metrics["params"]
    for key in ("macs", "latency_ms_b1", "latency_ms_b256", "int8_latency_ms_b1", "threads"):
        assert metrics[key] > 0, key
    ratios = metrics["vs_teacher"]
    assert ratios["size_ratio"] > 4  # 4-bit, half the weights zero, vs fp32
    assert ratios["accuracy_drop_points"] == pytest.approx(100 * (metrics["teacher"]["accuracy"] - metrics["accuracy"]))
    method = metrics["method"]
    assert method["prune"]["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert method["quant"]["bits"] == 4 and method["kd"]["alpha"] == 0.5
    assert method["kd_features"] == {"pairs": {"stem": "block1", "block1": "block1"}, "weight": 0.5}
    assert metrics["config"]["compress"]["prune_rate"] == 0.5 and metrics["config"]["workers"] == 2

    rc, evaluated, err = cli(
        "evaluate", "--checkpoint", str(out), "--data", str(tiny_cifar), "--out", str(tmp_path / "eval")
    )
    assert rc == 0, err[-3000:]
    assert {"macro_f1", "ece", "nll", "worst_class_recall"} <= set(
        evaluated
    )  # a compressed artifact scores the same way
    assert (tmp_path / "eval" / "confusion.png").is_file() and (tmp_path / "eval" / "reliability.png").is_file()
    assert evaluated["format"].startswith("effray.compress")
    assert evaluated["count"] == metrics["eval_images"]
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)


def test_ddp_on_two_nodes_resumes_after_a_node_is_killed_mid_epoch(cluster, tiny_cifar, tmp_path):
    """Fixed world size 2, one rank per node (validation all-reduced across them counts every
    row once): SIGKILL the node of rank 1 once epoch 2 is registered and add a node back;
    the run restarts from its newest committed checkpoint, redoes no epoch before it, and
    finishes on the survivor and the new node."""
    epochs, run_dir = 6, tmp_path / "killed"  # 4 epochs left after epoch 2 (~2 s each) for the kill to land mid-run
    args = [
        "train",
        "--data",
        str(tiny_cifar),
        *TRAIN,
        "--epochs",
        str(epochs),
        "--storage",
        str(tmp_path),
        "--name",
        "killed",
        "--max-failures",
        "3",
    ]
    driver = _driver(cluster, *args)
    registered = _wait_registered(run_dir, 2, driver)
    rows = _history(run_dir)
    if len(rows) < 2 or not registered:
        driver.kill()
        pytest.fail(f"no 2 epochs before the kill: {driver.communicate()[1][-3000:]}")
    victim = rows[-1]["nodes"][1]
    cluster.kill(victim)
    replacement = cluster.add(effray_node_replacement=1.0)
    try:
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    result = _result(out)
    rows = _history(run_dir)
    attempts = list(dict.fromkeys(r["attempt"] for r in rows))
    assert len(attempts) == 2, rows  # one restart
    second = [r for r in rows if r["attempt"] == attempts[1]]
    resumed = second[0]["resumed_from"]
    first_epochs = [r["epoch"] for r in rows if r["attempt"] == attempts[0]]
    assert resumed >= 2 and resumed in first_epochs  # from a checkpoint the first attempt committed
    assert [r["epoch"] for r in second] == list(range(resumed + 1, epochs + 1))  # no epoch twice past it
    _on_two_worker_nodes([r for r in rows if r["attempt"] == attempts[0]][-1]["nodes"], cluster)
    _on_two_worker_nodes(second[-1]["nodes"], cluster)
    assert victim not in second[-1]["nodes"]
    assert result["epoch"] == epochs and result["epochs_run_now"] == len(rows)
    assert all(r["val_count"] == 60 for r in rows) and result["val_accuracy"] > 0.1
    assert replacement in cluster.alive()


def test_elastic_training_shrinks_when_a_node_dies_and_grows_when_one_joins(cluster, tiny_cifar, tmp_path):
    """`--workers 2-3` on 3 free nodes trains on 3; SIGKILL one after epoch 2 and it goes
    on on the 2 left without waiting for a replacement; a node joins and, within a growth
    check, it restarts from its latest checkpoint on 3 and finishes there. Global batch and
    schedule stay: the optimizer steps of a fixed-size run, every training row once per
    epoch at either size, no epoch twice, and it still learns."""
    # 3 nodes only workers may use (an elastic run takes every worker slot it finds: on nodes
    # Ray Data also needs, the 3 survivors would hold 3 workers and leave its tasks no CPU)
    trainers = [cluster.add(elastic_trainer=1.0) for _ in range(3)]
    epochs, run_dir = 10, tmp_path / "elastic"  # after the shrink, enough left for a growth check (2 s) and a restart
    driver = _driver(
        cluster,
        "train",
        "--data",
        str(tiny_cifar),
        *TRAIN,
        "--workers",
        "2-3",
        "--worker-resources",
        "elastic_trainer=1",
        "--batch-size",
        "60",
        "--epochs",
        str(epochs),
        "--max-failures",
        "3",
        "--grow-check-s",
        "2",
        "--storage",
        str(tmp_path),
        "--name",
        "elastic",
    )
    try:
        assert _wait_registered(run_dir, 2, driver), "no 2 epochs before the kill"
        killed = _history(run_dir)[-1]["nodes"][1]
        cluster.kill(killed)
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline and not any(r["world"] == 2 for r in _history(run_dir)):
            time.sleep(0.2)
        assert any(r["world"] == 2 for r in _history(run_dir)), "no epoch on the 2 nodes left"
        joined = cluster.add(elastic_trainer=1.0)
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    result, rows = _result(out), _history(run_dir)
    worlds = [r["world"] for r in rows]
    first_two = worlds.index(2)
    assert worlds[0] == 3 and worlds[-1] == 3 and 2 in worlds, worlds  # shrank, then grew
    assert set(worlds[first_two:]) == {2, 3} and worlds[first_two:] == sorted(worlds[first_two:]), (
        worlds
    )  # shrank once, grew once
    assert killed not in rows[first_two]["nodes"] and len(set(rows[first_two]["nodes"])) == 2
    assert joined in rows[-1]["nodes"] and set(rows[-1]["nodes"]) == {*trainers, joined} - {killed}
    calm, two, regrown = (
        rows[:first_two],
        [r["epoch"] for r in rows if r["world"] == 2],
        rows[worlds.index(3, first_two) :],
    )
    assert 3 <= two[0] <= calm[-1]["epoch"] + 1  # resumed from a checkpoint the 3-node stretch committed
    assert two == list(range(two[0], two[0] + len(two)))  # on 2 nodes: each epoch once, none skipped
    assert regrown[0]["epoch"] <= two[-1] + 1  # grown from the latest checkpoint, nothing skipped
    assert [r["epoch"] for r in regrown] == list(range(regrown[0]["epoch"], epochs + 1))
    assert all(r["train_rows"] == 540 for r in rows)  # each training row once per epoch, 3 or 2 workers
    assert result["epoch"] == epochs and rows[-1]["optimizer_steps"] == 9 * epochs  # 540 rows / 60 per global batch
    assert result["val_accuracy"] >= 0.2, result  # 10 classes: chance is 0.1


def test_prepare_decodes_on_every_node(cluster, tmp_path):
    """15,000 rows are 3 decode tasks of 1 CPU on 3 nodes of 1 CPU: one on each."""
    rc, result, err = cli("data", "prepare", "--source", "synthetic:15000", "--out", str(tmp_path / "data"))
    assert rc == 0, err[-3000:]
    assert sum(result["counts"].values()) == 15000
    assert len(result["decoded_on_nodes"]) == 3 and cluster.head not in result["decoded_on_nodes"]


def test_sensitivity_probes_run_on_every_node_and_a_rerun_reuses_them(cluster, tiny_cifar, teacher, tmp_path):
    """A layer per task, 1 CPU each, on 3 worker nodes of 1 CPU: the probes spread over the
    nodes (never the CPU-less head); the same command again runs nothing."""
    args = ["sensitivity", "--teacher", str(teacher), "--data", str(tiny_cifar), "--out", str(tmp_path / "sens")]
    rc, result, err = cli(*args, "--bits", "4", "--rates", "0.5", "--kinds", "unstructured", "--calib-images", "60")
    assert rc == 0, err[-3000:]
    assert result["tasks_run"] == result["layers"] + 1 and result["skipped"] == 0
    assert len(result["probed_on_nodes"]) >= 2 and cluster.head not in result["probed_on_nodes"]
    rc, again, err = cli(*args, "--bits", "4", "--rates", "0.5", "--kinds", "unstructured", "--calib-images", "60")
    assert rc == 0 and again["tasks_run"] == 0 and again["probed_on_nodes"] == result["probed_on_nodes"]


def test_tune_trials_spread_and_one_on_a_killed_node_resumes(cluster, tiny_cifar, teacher, tmp_path):
    """Two 1-CPU trials at once (1 fine-tuning epoch and 8) land on two nodes; SIGKILL the
    long one's node after its second epoch: that trial is retried on another node from its
    last epoch's checkpoint, the short one is not rerun, and the report has each trial once.
    Every epoch, the retried ones included, carries ``--max-corruption-drop``'s score."""
    import pandas as pd
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "finetune_epochs": {"grid": [1, 8]},
                "prune_rate": 0.3,
                "bits": 8,
                "finetune_batch_size": 64,
                "calib_batches": 1,
                "int8": False,
            }
        )
    )
    experiment = tmp_path / "runs" / "killed"
    driver = _driver(
        cluster,
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
        "none",
        "--cpus-per-trial",
        "1",
        "--max-concurrent",
        "2",
        "--max-failures",
        "2",
        "--deploy",
        "off",  # no export per trial: this search is about a node's death
        "--robust-images",
        "8",
        "--max-corruption-drop",
        "100",  # never binding: each epoch's corruption score, on whichever node the trial lands
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "killed",
        "--no-wandb",
    )

    def long_trial() -> list[dict]:
        return next(
            (
                rows
                for rows in trial_rows(experiment).values()
                if rows and rows[0]["config"]["compress"]["finetune_epochs"] == 8
            ),
            [],
        )

    deadline = time.time() + 300
    while len(long_trial()) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    before = long_trial()
    if len(before) < 2:
        driver.kill()
        pytest.fail(f"the long trial reported no 2 epochs: {driver.communicate()[1][-3000:]}")
    victim = before[-1]["node"]
    cluster.kill(victim)
    try:
        out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert _result(out)["finished"] == 2
    rows = trial_rows(experiment)
    (short,) = [r for r in rows.values() if r[0]["config"]["compress"]["finetune_epochs"] == 1]
    (long,) = [r for r in rows.values() if r[0]["config"]["compress"]["finetune_epochs"] == 8]
    assert short[0]["node"] != long[0]["node"] and cluster.head not in (short[0]["node"], long[0]["node"])
    restarts = [i for i, r in enumerate(long) if r["iterations_since_restore"] == 1]
    assert len(restarts) == 2, [(r["epoch"], r["iterations_since_restore"]) for r in long]  # one retry
    first, retry = long[: restarts[1]], long[restarts[1] :]
    resumed_after = retry[0]["epoch"] - 1
    assert resumed_after >= 2 and resumed_after in [r["epoch"] for r in first]  # its last checkpoint, not epoch 0
    assert [r["epoch"] for r in retry] == list(range(resumed_after + 1, 10))  # epochs 1..8, then the final (9)
    assert victim not in {r["node"] for r in retry}
    epochs = [r for r in short + long if "train_loss" in r]
    assert all(0 <= r["val_corruption_accuracy"] <= 1 for r in epochs)  # the floor's score, retry included
    assert [r["iterations_since_restore"] for r in short] == list(range(1, len(short) + 1))  # never rerun
    assert sum(bool(r.get("final")) for r in short) == sum(bool(r.get("final")) for r in long) == 1
    rc, report, err = cli("report", "--experiment", str(experiment))
    assert rc == 0, err[-3000:]
    table = pd.read_parquet(experiment / "report" / "results.parquet")
    assert sorted(table["trial_id"]) == sorted(r[0]["trial_id"] for r in rows.values())  # each trial once


def test_node_local_storage_is_refused_on_real_nodes(cluster, tiny_cifar, tmp_path):
    """A node whose filesystem lacks the path (a private mount namespace hides it, as a
    node-local disk would) makes `train` refuse it in one line before any worker starts;
    a path every node sees passes. Last in the module: the extra node dies afterwards."""
    import os
    import signal
    import subprocess
    import sys

    from effray.errors import EffrayError
    from effray.storage import check_storage_for_cluster

    local = tmp_path / "node-local"
    local.mkdir()
    ray_cli = Path(sys.executable).parent / "ray"
    before = set(cluster.alive())
    blind = subprocess.Popen(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs tmpfs {local} && exec {ray_cli} start --block "
            f"--address={cluster.address} --num-cpus=0 --object-store-memory={NODE_STORE}",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not set(cluster.alive()) - before and time.time() < deadline:
            time.sleep(0.5)
        (node,) = set(cluster.alive()) - before
        with pytest.raises(EffrayError, match=rf"can't see it.*{node[:8]}|{node[:8]}.*can't see it") as err:
            check_storage_for_cluster(str(local / "runs"))
        assert "\n" not in str(err.value) and "s3://" in str(err.value)
        rc, _, stderr = cli(
            "train",
            "--data",
            str(tiny_cifar),
            *TRAIN,
            "--epochs",
            "1",
            "--storage",
            str(local / "runs"),
            "--name",
            "refused",
        )
        assert rc == 2 and stderr.count("\n") == 1 and node[:8] in stderr
        assert not (local / "runs" / "refused").exists()  # refused before anything was written
        check_storage_for_cluster(str(tmp_path / "shared"))  # every node sees this one
    finally:
        os.killpg(blind.pid, signal.SIGKILL)
        blind.wait()
