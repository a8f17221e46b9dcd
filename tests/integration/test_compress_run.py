"""`effray compress` on local Ray with tiny real data: a 2-worker Ray Train fine-tune, the
metrics file against the artifact, and bad input refused before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from effray.cli import main
from effray.data.prepare import load_meta
from effray.models import build_model
from effray.train.checkpoint import data_summary, save_payload, train_payload


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compressed(ray_session, tiny_cifar, teacher, tmp_path_factory):
    """One Ray Train fit: 2 gloo workers, 50% unstructured pruning, 4-bit QAT, KD, 2 epochs
    (pruned at epoch 0, quantized at epoch 1: DDP is re-prepared twice); rank 1 dies in
    epoch 2 and the restart goes on from epoch 1's checkpoint (pruned, not yet quantized)."""
    out = tmp_path_factory.mktemp("compress") / "artifact"
    args = ["compress", "--teacher", str(teacher), "--data", str(tiny_cifar), "--out", str(out),
            "--prune-rate", "0.5", "--bits", "4", "--kd-alpha", "0.5", "--kd-temperature", "4",
            "--finetune-epochs", "2", "--finetune-batch-size", "64", "--finetune-lr", "0.02",
            "--calib-batches", "2", "--eval-batch-size", "64",
            "--workers", "2", "--cpus-per-worker", "0.5", "--data-cpus", "1",
            "--inject-failure-at-epoch", "2", "--max-failures", "1"]  # fmt: skip
    return out, args


@pytest.mark.slow
def test_compress_on_ray_train_measures_the_file(compressed, tiny_cifar, capsys):
    out, args = compressed
    assert main(args) == 0
    printed = _last_json(capsys.readouterr().out)
    assert printed["workers"] == 2 and printed["out"] == str(out)
    metrics = json.loads((out / "metrics.json").read_text())

    assert metrics["accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert metrics["bytes"] == os.path.getsize(out / "model.pt") == printed["bytes"]
    assert metrics["nonzero_params"] < metrics["params"]
    for key in ("macs", "latency_ms_b1", "latency_ms_b256", "int8_latency_ms_b1", "threads"):
        assert metrics[key] > 0, key
    ratios = metrics["vs_teacher"]
    assert ratios["size_ratio"] > 4  # 4-bit, half the weights zero, vs fp32
    assert ratios["accuracy_drop_points"] == pytest.approx(100 * (metrics["teacher"]["accuracy"] - metrics["accuracy"]))
    method = metrics["method"]
    assert method["prune"]["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert method["quant"]["bits"] == 4 and method["kd"]["alpha"] == 0.5
    assert metrics["config"]["compress"]["prune_rate"] == 0.5 and metrics["config"]["workers"] == 2
    finetune = metrics["finetune"]
    assert finetune["world"] == 2 and [e["epoch"] for e in finetune["epochs"]] == [1, 2]
    assert finetune["resumed_from"] == 1  # the restart after the injected death: no epoch twice
    assert finetune["final"]["val_count"] == metrics["eval_images"]  # exact validation: every row once
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt"]

    assert main(["evaluate", "--checkpoint", str(out), "--data", str(tiny_cifar), "--out", str(out.parent / "eval")]) == 0
    evaluated = _last_json(capsys.readouterr().out)
    assert {"macro_f1", "ece", "nll", "worst_class_recall"} <= set(evaluated)  # a compressed artifact scores the same way
    assert (out.parent / "eval" / "confusion.png").is_file() and (out.parent / "eval" / "reliability.png").is_file()
    assert evaluated["format"] == "effray.compressed" or evaluated["format"].startswith("effray.compress")
    assert evaluated["count"] == metrics["eval_images"]
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)


@pytest.fixture(scope="module")
def five_class_teacher(tiny_cifar, tmp_path_factory) -> Path:
    meta = load_meta(tiny_cifar)
    model = build_model("convnet", 5, 3, 0.25)
    out = tmp_path_factory.mktemp("teacher5")
    save_payload(out, train_payload(model_state=model.state_dict(), model_spec=model.spec, optimizer={}, scheduler={},
                                    epoch=0, config={}, data=data_summary(meta), history=[], provenance={}, elapsed_s=0.0))  # fmt: skip
    return out


@pytest.mark.parametrize("case", ["prune-rate", "bits", "temperature", "teacher", "classes", "existing-out"])
def test_bad_input_is_one_line_exit_2_nothing_written(ray_session, tiny_cifar, teacher, five_class_teacher, tmp_path,
                                                      capsys, case):  # fmt: skip
    out = tmp_path / "out"
    extra: list[str] = []
    ckpt = str(teacher)
    if case == "prune-rate":
        extra = ["--prune-rate", "1.0"]
    elif case == "bits":
        extra = ["--bits", "9"]
    elif case == "temperature":
        extra = ["--kd-alpha", "0.5", "--kd-temperature", "0"]
    elif case == "teacher":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        ckpt = str(bad)
    elif case == "classes":
        ckpt = str(five_class_teacher)
        extra = ["--student", "convnet"]
    elif case == "existing-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["compress", "--teacher", ckpt, "--data", str(tiny_cifar), "--out", str(out),
                 "--workers", "2", "--cpus-per-worker", "0.5", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("effray: error:"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if case == "existing-out":
        assert (out / "keep.txt").read_text() == "mine"
