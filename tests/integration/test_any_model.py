"""A model of the user's own, a timm ViT and the worked example's torchvision nets through
every stage on local Ray, on real Imagenette images made small (200 rows at 64 px; the preset
at 32 px): the Python API (train -> compress with structured pruning, 4-bit QAT and KD ->
export -> evaluate) for a hand-written residual + depthwise module; the CLI for a timm ViT
(train on Ray Train -> compress its heads and MLPs with 4-bit QAT and KD on Ray Train ->
evaluate -> every export -> predict on Ray Data -> serve over HTTP;
tests/unit/test_compress_recipe.py distils one into a CNN); and the ``imagenette-resnet50``
preset end to end on a tiny slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import IMAGENETTE, call, cli, png

import effray.compress
import effray.train
from effray.cluster import free_port
from effray.compress.artifact import load_artifact
from effray.data.arrays import load_arrays
from effray.deploy.config import ServeConfig
from effray.deploy.model import load_deployable
from effray.deploy.serve import start, stop
from effray.train.checkpoint import read_payload
from tests.user_models import residual_dw

ROOT = Path(__file__).resolve().parents[2]
SIZE, ROWS = 64, 200  # the first 200 rows of the real 224 px file (20 per class), resized by `data prepare`
PRESET_SIZE = 32  # the preset's ResNet-50 at 32 px: its five stride-2 stages still leave a 1x1 map
VIT = "timm:vit_tiny_patch16_224?img_size=64,depth=2"  # 16 patches of 16 px, 192 wide, 3 heads, 2 blocks


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory) -> Path:
    from effray.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "imagenette"
    prepare(PrepareConfig(source=str(IMAGENETTE), out=str(out), limit=ROWS, image_size=SIZE, val_fraction=0.2))
    return out


def test_a_users_own_module_goes_through_every_stage_from_the_python_api(prepared, tmp_path):
    trained = effray.train(
        model=residual_dw,
        data=str(prepared),
        epochs=1,
        batch_size=32,
        lr=0.05,
        workers=1,
        storage=str(tmp_path / "runs"),
        name="user",
        wandb=False,
    )
    ckpt = Path(trained["checkpoint"])
    # the factory, by reference (this process holds it, as the API was handed it: no --trust-code needed here;
    # tests/unit/test_model_reference.py checks a fresh loader refuses it)
    assert read_payload(ckpt)["model_spec"]["name"] == "tests.user_models:residual_dw"
    summary = effray.compress(
        str(ckpt),
        model=residual_dw,
        data=str(prepared),
        out=str(tmp_path / "small"),
        prune_rate=0.5,
        prune_kind="structured",
        bits=4,
        kd_alpha=0.7,
        finetune_epochs=1,
        finetune_batch_size=32,
        workers=1,
    )
    # ratios are teacher / student: 4-bit weights and half the channels (the layout's bytes on top)
    assert summary["bytes"] > 0 and summary["size_ratio"] > 2.0
    assert summary["macs_ratio"] > 1.25 and 0.0 <= summary["accuracy"] <= 1.0
    rc, exported, err = cli(
        "export", "--artifact", summary["out"], "--format", "all", "--split", "train", "--trust-code"
    )
    assert rc == 0, err
    assert all(p["agreement"] >= 0.999 for p in exported["parity"].values()), exported["parity"]
    rc, evaluated, err = cli("evaluate", "--checkpoint", summary["artifact"], "--data", str(prepared), "--trust-code")
    assert rc == 0, err
    assert evaluated["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-6)
    # the temperature compress fitted on val, recorded in the artifact, gives evaluate the same scaled ECE
    assert evaluated["temperature"] == summary["temperature"] and summary["temperature"] > 0
    assert evaluated["ece_scaled"] == pytest.approx(summary["ece_scaled"], abs=1e-6)
    assert evaluated["ece"] == pytest.approx(summary["ece"], abs=1e-6)


@pytest.mark.slow
def test_a_timm_vit_compresses_on_ray_train_exports_predicts_and_serves(prepared, tmp_path):
    # the teacher: the ViT trained by reference on Ray Train (one epoch, random init: timm builds it offline)
    common = ("--data", str(prepared), "--workers", "1")
    rc, trained, err = cli(
        "train",
        "--model",
        VIT,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "0.01",
        *common,
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "vit",
        "--no-wandb",
    )
    assert rc == 0 and trained["epochs_run_now"] == 1, err
    spec = read_payload(trained["checkpoint"])["model_spec"]
    assert (spec["name"], spec["library"], spec["num_classes"]) == ("timm:vit_tiny_patch16_224", "timm", 10)
    # the ViT itself: whole heads and MLP channels pruned, 4-bit QAT on every projection, KD from its trained self
    fine_tune = ("--finetune-epochs", "1", "--finetune-batch-size", "32", "--kd-alpha", "0.7", "--bits", "4")
    rc, vit, err = cli(
        "compress",
        "--teacher",
        trained["checkpoint"],
        "--out",
        str(tmp_path / "vit"),
        "--prune-kind",
        "structured",
        "--prune-rate",
        "0.4",
        *fine_tune,
        *common,
    )
    assert rc == 0, err
    assert vit["size_ratio"] > 2.0 and vit["macs_ratio"] > 1.2, vit
    rc, evaluated, err = cli("evaluate", "--checkpoint", vit["artifact"], "--data", str(prepared))
    assert rc == 0 and evaluated["accuracy"] == pytest.approx(vit["accuracy"], abs=1e-6), err
    rc, exported, err = cli("export", "--artifact", vit["out"], "--format", "all", "--out", str(tmp_path / "export"))
    assert rc == 0, err
    assert {"torch", "onnx", "openvino"} <= set(exported["parity"]), exported["parity"]
    assert all(p["agreement"] >= 0.999 for p in exported["parity"].values()), exported["parity"]
    # batch inference on Ray Data with the ONNX file: the answers the file gives in process
    rc, predicted, err = cli(
        "predict",
        "--model",
        str(tmp_path / "export"),
        "--kind",
        "onnx",
        "--data",
        str(prepared),
        "--split",
        "val",
        "--out",
        str(tmp_path / "pred"),
    )
    assert rc == 0 and predicted["predicted"] == predicted["rows"] == 40, err
    val = load_arrays(prepared, "val")
    table = pq.read_table(tmp_path / "pred" / "predictions.parquet").to_pydict()
    order = np.argsort(table["index"])
    onnx = load_deployable(tmp_path / "export", kind="onnx", device="cpu")
    assert np.array_equal(np.asarray(table["predicted"])[order], onnx.logits(val["image"]).argmax(axis=1))
    url = start(ServeConfig(model=str(tmp_path / "export"), kind="onnx", host="127.0.0.1", port=free_port()))
    try:
        status, body = call(url, "/predict", png(val["image"][0]))
        assert status == 200 and body["label"] == int(onnx.logits(val["image"][:1]).argmax()), body
    finally:
        stop()


@pytest.mark.slow
def test_the_imagenette_resnet50_preset_runs_end_to_end_on_a_tiny_slice(ray_session, tmp_path, monkeypatch):
    """The shipped preset with its sizes cut: a torchvision ResNet-50 teacher, one trial of a
    ResNet-18 student distilled (logits and its last two stages' features), pruned through
    its residual graph and quantized, exported."""
    monkeypatch.chdir(ROOT)  # the preset names its source relative to the repository
    space = tmp_path / "space.yaml"
    space.write_text(
        "student: torchvision:resnet18\nprune_kind: structured\nprune_rate: 0.3\nbits: 4\nkd_alpha: 0.7\n"
        "kd_features: layer3,layer4\n"
        "finetune_epochs: 1\nfinetune_batch_size: 32\n"
    )
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        "base: imagenette-resnet50\n"  # its own source, the real 224 px file: 200 rows cut to 32 px
        f"prepare: {{limit: {ROWS}, image_size: {PRESET_SIZE}, val_fraction: 0.2}}\n"
        "train: {epochs: 1, batch_size: 32, workers: 1, gpus_per_worker: 0, cpus_per_worker: 1, data_cpus: 0.5,"
        f" data: {{augment: 'random_resized_crop({PRESET_SIZE}, scale=(0.35, 1))|flip|rotate(10)"
        "|jitter(0.4,0.4,0.4,0.1)|grayscale(0.1)'}}\n"
        # the corruption baseline on 8 val images, not all 40: a ResNet-50's 30 corruption passes cost the most here
        f"tune: {{space: {space}, num_samples: 1, gpus_per_trial: 0, cpus_per_trial: 1, grace_period: 1,"
        # no deployed latency (run_resume times an `effray run`'s front); the exports are written all the same
        " robust_images: 8, deploy: 'off'}\n"
    )
    moved = [] if IMAGENETTE == ROOT.parent / "shared" / "data" / IMAGENETTE.name else ["--source", str(IMAGENETTE)]
    rc, summary, err = cli("run", "--preset", str(preset), "--out", str(tmp_path / "run"), "--clean", "off", *moved)
    assert rc == 0, err
    teacher = Path(summary["teacher"]["checkpoint"])
    payload = read_payload(teacher)
    spec, data = payload["model_spec"], payload["data"]  # a checkpoint records how to rebuild it and what it takes
    assert (spec["name"], spec["library"], spec["num_classes"]) == ("torchvision:resnet50", "torchvision", 10)
    assert data["image_shape"] == [PRESET_SIZE, PRESET_SIZE, 3] and data["preprocess"]
    assert summary["trials"] == 1 and summary["exports"]
    assert summary["test"]["images"] == 20 and set(summary["test"]["front"]) == set(summary["exports"])  # 10 % of 200
    assert not any(e["error"] for e in summary["exports"].values()), summary["exports"]
    # the pick's int8 files: PT2E can't lower a torchvision ResNet's graph, so its torch int8 program is skipped
    # with the reason, and the ONNX / OpenVINO int8 files are written all the same (unless one misses its parity
    # bar on these 40 val images: then the pick keeps its fp32 files, as before)
    (pick,) = summary["exports"].values()
    (trial,) = pq.read_table(Path(summary["report"]).with_name("results.parquet")).column("artifact").to_pylist()
    _, artifact = load_artifact(trial)
    assert artifact["method"]["kd_features"]["pairs"] == {"layer3": "layer3", "layer4": "layer4"}
    sidecar = json.loads((Path(pick["dir"]) / "deploy.json").read_text())
    assert "torch-int8" not in sidecar["files"] and pick["int8"] is ("onnx-int8" in sidecar["files"])
    if pick["int8"]:
        assert "can't quantize this model's graph" in sidecar["int8"]["skipped"]["torch-int8"]
        assert "openvino-int8" in sidecar["files"]
