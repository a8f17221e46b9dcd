"""`effray train` / `effray evaluate` end to end on local Ray: 2 CPU workers, 540 real CIFAR images.

Two Ray Train fits in all (each costs tens of seconds on 2 cores): one module-scoped
run with an injected worker death serves most assertions, and a re-run after corrupting
the newest checkpoint. A re-run of the finished run starts no worker (it reads Ray
Train's saved result); nor do the bad-input tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import cli, save_checkpoint

from effray.cli import main
from effray.hardware import bf16_native
from effray.train.faults import FAILURE_MARKER
from effray.train.loop import HISTORY_FILE
from effray.train.run import RUN_FILE

pytestmark = pytest.mark.usefixtures("ray_session")

EPOCHS, FAIL_AT = 5, 3
# airbench with its whole recipe, so the fit also covers: the whitening stem set from the
# data in every worker, 3 param groups, lookahead across a worker death and a redone
# epoch, and TTA in validation that `effray evaluate` reproduces from the checkpoint
# no --cpus-per-worker: "auto" fits 2 workers into the session's 2 CPUs (0.5 each, 1 left for Ray Data)
RECIPE = [
    "--model",
    "airbench",
    "--width",
    "0.25",
    "--workers",
    "2",
    "--batch-size",
    "64",
    "--lr",
    "0.4",
    "--bias-lr-scale",
    "8",
    "--lookahead",
    "--tta",
    "2",
    "--augment",
    "flip",
    "--keep-checkpoints",
    "2",
    "--wandb-project",
    "effray-tests",
]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / HISTORY_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tiny_cifar, tmp_path_factory):
    """One DDP run whose worker rank 1 dies during epoch FAIL_AT (fit 1)."""
    storage = tmp_path_factory.mktemp("runs")
    args = [
        "train",
        "--data",
        str(tiny_cifar),
        *RECIPE,
        "--epochs",
        str(EPOCHS),
        "--storage",
        str(storage),
        "--name",
        "ddp",
        "--max-failures",
        "2",
        "--inject-failure-at-epoch",
        str(FAIL_AT),
    ]
    rc, result, err = cli(*args)
    assert rc == 0, err
    return {"args": args, "result": result, "run_dir": Path(storage) / "ddp", "storage": storage}


@pytest.mark.slow
def test_ddp_learns_and_resumes_after_a_worker_dies(run):
    result, run_dir = run["result"], run["run_dir"]
    rows = history(run_dir)
    assert (run_dir / FAILURE_MARKER).is_file()  # the worker really died
    # every epoch ran exactly once: the restart resumed from the epoch FAIL_AT-1 checkpoint
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    attempts = list(dict.fromkeys(r["attempt"] for r in rows))
    assert len(attempts) == 2
    assert {r["resumed_from"] for r in rows if r["attempt"] == attempts[1]} == {FAIL_AT - 1}
    # it learns: training loss falls, validation beats chance (10 classes)
    assert rows[-1]["train_loss"] < 0.85 * rows[0]["train_loss"]
    assert result["epoch"] == EPOCHS and result["val_count"] == 60
    assert result["val_accuracy"] > 0.1 and result["val_loss"] < math.log(10)
    assert Path(result["checkpoint"], "model.pt").is_file()
    assert json.loads((run_dir / RUN_FILE).read_text())["config"]["cpus_per_worker"] == 0.5  # auto, resolved


@pytest.mark.slow
def test_evaluate_reproduces_the_reported_val_accuracy(run, tiny_cifar, cifar_parquet, tmp_path):
    want = run["result"]["val_accuracy"]
    ckpt = run["result"]["checkpoint"]
    rc, res, err = cli("evaluate", "--checkpoint", ckpt, "--data", str(tiny_cifar), "--out", str(tmp_path / "eval"))
    assert rc == 0, err
    assert abs(res["accuracy"] - want) <= 1e-6 and res["count"] == 60
    # beyond accuracy: the same logits' NLL is the loss, recall is per-class accuracy
    assert res["nll"] == pytest.approx(res["loss"], rel=1e-5) and 0 <= res["ece"] <= 1
    assert sum(map(sum, res["confusion"])) == 60 and 0 <= res["macro_f1"] <= 1
    assert all(
        res["per_class"][c]["recall"] == pytest.approx(a) for c, a in res["per_class_accuracy"].items() if a is not None
    )
    # torchmetrics' recall is float32, the per-class accuracy float64 sums: equal to float32's precision
    assert res["worst_class_recall"] == pytest.approx(
        min(a for a in res["per_class_accuracy"].values() if a is not None)
    )
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["confusion.png", "metrics.json", "reliability.png"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["ece"] == res["ece"]
    assert abs(res["loss"] - run["result"]["val_loss"]) <= 1e-5
    # scored as training scored it: channels-last, bf16 where this CPU computes it natively
    assert res["numerics"] == {"bf16": bf16_native(torch.device("cpu")), "channels_last": True}
    assert set(res["per_class_accuracy"]) == {
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    }
    # the same 60 images as JPEG rows in the shared file's schema (image bytes + label + name)
    val_rows = pq.read_table(sorted(Path(tiny_cifar, "val").glob("*.parquet"))).column("index")
    jpeg = tmp_path / "val-jpeg.parquet"
    pq.write_table(pq.read_table(cifar_parquet).take(pa.array(val_rows.to_pylist())), jpeg)
    rc, res2, err = cli(
        "evaluate", "--checkpoint", str(Path(ckpt, "model.pt")), "--data", str(jpeg), "--batch-size", "7"
    )
    assert rc == 0, err
    assert abs(res2["accuracy"] - want) <= 1e-6 and 0.0 <= res2["accuracy"] <= 1.0


@pytest.mark.slow
def test_wandb_offline_run_has_config_metrics_and_model(run):
    dirs = sorted((run["run_dir"] / "wandb").glob("offline-run-*"))
    assert dirs and len({d.name.split("-", 3)[-1] for d in dirs}) == 1  # one stable run id across restarts
    from helpers import read_wandb_run

    logs = [read_wandb_run(next(d.glob("run-*.wandb"))) for d in dirs]
    assert all(log["config"]["model"] == "airbench" and log["config"]["epochs"] == EPOCHS for log in logs)
    assert all(log["config"]["tta"] == 2 and log["config"]["lookahead"] is True for log in logs)
    assert logs[0]["config"]["provenance"]["data_checksum"].startswith("sha256:")
    epochs = sorted({h["epoch"] for log in logs for h in log["history"] if "epoch" in h})
    assert epochs == list(range(1, EPOCHS + 1))
    assert all({"val_accuracy", "train_loss", "images_per_s", "lr"} <= set(h) for log in logs for h in log["history"])
    assert any(a.startswith("ddp-model") for log in logs for a in log["artifacts"])


@pytest.mark.slow
def test_rerunning_a_finished_run_resumes_without_new_epochs(run):
    before = {p: p.stat().st_mtime_ns for p in run["run_dir"].rglob("*") if p.is_file()}
    rc, again, err = cli(*run["args"])  # the same command: no fit, the finished run's result
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in run["run_dir"].rglob("*") if p.is_file()} == before  # nothing written
    assert again["epochs_run_now"] == 0 and again["epoch"] == EPOCHS
    assert again["checkpoint"] == run["result"]["checkpoint"]
    assert again["val_accuracy"] == run["result"]["val_accuracy"]
    assert len(history(run["run_dir"])) == EPOCHS


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(run):
    newest = Path(run["result"]["checkpoint"], "model.pt")
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated mid-write
    rc, res, err = cli(*run["args"])  # fit 2
    assert rc == 0, err
    assert res["epochs_run_now"] == 1 and res["epoch"] == EPOCHS
    assert history(run["run_dir"])[-1]["resumed_from"] == EPOCHS - 1
    assert res["checkpoint"] != run["result"]["checkpoint"]
    # deterministic on CPU: the redone epoch reproduces the original numbers
    assert abs(res["train_loss"] - run["result"]["train_loss"]) < 1e-6
    assert res["val_accuracy"] == run["result"]["val_accuracy"]


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written


def _fails(capsys, *args: str) -> str:
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("effray: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "resnet7"], "unknown --model 'resnet7'"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "-8"], "--batch-size must be a positive integer"),
        (["--workers", "0"], "--workers must be a positive integer"),
        (["--batch-size", "63"], "multiple of --workers"),
        (["--gpus-per-worker", "1"], "needs 2 GPUs, the cluster has 0"),
        (["--cpus-per-worker", "8"], "needs 17 CPUs, the cluster has 2"),
    ],
)
def test_bad_train_flags_fail_before_any_worker_starts(capsys, tiny_cifar, tmp_path, extra, message):
    storage = tmp_path / "runs"
    err = _fails(
        capsys, "train", "--data", str(tiny_cifar), *RECIPE, "--epochs", "1", "--storage", str(storage), *extra
    )
    assert message in err
    assert not storage.exists()


def test_unprepared_data_dir_is_one_line(capsys, tmp_path):
    (tmp_path / "raw").mkdir()
    err = _fails(capsys, "train", "--data", str(tmp_path / "raw"), *RECIPE, "--storage", str(tmp_path / "runs"))
    assert "is not a prepared dataset" in err and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resuming_a_run_with_another_model_is_refused(capsys, run, tiny_cifar):
    before = {p: p.stat().st_mtime_ns for p in run["run_dir"].rglob("*")}
    args = [a if a != "airbench" else "resnet20" for a in run["args"]]
    err = _fails(capsys, *args)
    assert "holds model airbench" in err and "not resnet20" in err
    assert {p: p.stat().st_mtime_ns for p in run["run_dir"].rglob("*")} == before


def test_evaluate_refuses_a_checkpoint_of_another_model(capsys, tiny_cifar, tmp_path):
    import torch

    from effray.data.prepare import load_meta
    from effray.models import build_model
    from effray.train.checkpoint import data_summary

    model = build_model("convnet", num_classes=5)
    data = {**data_summary(load_meta(tiny_cifar)), "num_classes": 5, "classes": list("abcde")}
    save_checkpoint(tmp_path / "five", model, data=data)
    err = _fails(capsys, "evaluate", "--checkpoint", str(tmp_path / "five"), "--data", str(tiny_cifar))
    assert "5-class convnet" in err and "another model" in err
    err = _fails(capsys, "evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(tiny_cifar))
    assert "no checkpoint at" in err
    assert torch.load(tmp_path / "five" / "model.pt", weights_only=True)["epoch"] == 1
