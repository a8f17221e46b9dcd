"""``effray export`` on a real compressed artifact of a real (tiny) CIFAR-10 teacher: every
format written (OpenVINO's converted from the ONNX files: a runtime that did not produce
them), loaded back and checked against the artifact; bad inputs fail in one line with
nothing written."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli

from effray.compress.config import CompressConfig
from effray.compress.fakequant import QUANT_TYPES
from effray.compress.recipe import compress_local
from effray.config import validated
from effray.data.arrays import epoch_batches, eval_batches, load_arrays, prepared_batches
from effray.data.prepare import load_meta
from effray.deploy.batch import Classifier
from effray.deploy.config import ExportConfig
from effray.deploy.export import check_dataset, export
from effray.deploy.model import EXPORT_FILES, SIDECAR, load_deployable, open_checkpoint, softmax
from effray.deploy.replica import answer
from effray.errors import EffrayError
from effray.search.deployed import DeploySpec, deploy_probe
from effray.train.checkpoint import data_summary, load_checkpoint, read_payload, save_payload

pytestmark = pytest.mark.usefixtures("one_thread")


def _compress(tiny_cifar: Path, teacher: Path, out: Path, cfg: CompressConfig) -> Path:
    """A compressed artifact from the in-process recipe, its teacher recording its dataset
    as a training run's config does (what ``--data ''`` follows)."""
    recorded = out.parent / f"{out.name}-teacher"
    save_payload(recorded, {**read_payload(teacher), "config": {"data": {"data": str(tiny_cifar)}}})
    meta, arrays = load_meta(tiny_cifar), load_arrays(tiny_cifar, "train")
    model, _ = load_checkpoint(recorded)
    train = lambda epoch: epoch_batches(arrays, meta, 64, policy="flip", seed=0, epoch=epoch, device="cpu")  # noqa: E731
    calib = eval_batches(arrays, meta, 128)[:2]
    evals = eval_batches(load_arrays(tiny_cifar, "val"), meta, 128)
    compress_local(
        model,
        validated(cfg),
        train,
        calib,
        evals,
        out,
        teacher_info={"path": str(recorded)},
        data=data_summary(meta),
        teacher_metrics={},
        log=lambda line: None,
    )
    return out


@pytest.fixture(scope="module")
def artifact(tiny_cifar, teacher, tmp_path_factory) -> Path:
    """Half the weights pruned, 4-bit QAT weights (first/last layers 8), float activations:
    the exported float graph is then the artifact's own arithmetic (8-bit activation
    quantizers, which it drops, flip near-tied images of this tiny model now and then)."""
    cfg = CompressConfig(
        prune_rate=0.5, bits=4, act_bits=32, finetune_epochs=1, finetune_lr=0.01, calib_batches=2, int8=False
    )
    return _compress(tiny_cifar, teacher, tmp_path_factory.mktemp("export") / "artifact", cfg)


def _images(data: Path, split: str) -> np.ndarray:
    return np.concatenate([x for x, _ in prepared_batches(data, split, 256)[1]])


def test_every_format_is_written_checked_and_opens_like_the_artifact(artifact, tiny_cifar, tmp_path):
    """Parity runs on the 540 training rows: the tiny teacher is near chance on its 60
    held-out rows (27 %), where top-2 logits tie and int8 noise alone flips 2 of 60."""
    out = tmp_path / "deploy"
    rc, summary, err = cli(
        "export",
        "--artifact",
        str(artifact),
        "--format",
        "all",
        "--int8",
        "--out",
        str(out),
        "--split",
        "train",
        "--batch-size",
        "64",
        "--calib-batches",
        "4",
    )
    assert rc == 0, err
    assert "W1" not in err and "Warning" not in err, err  # torch's and torchao's chatter stays off the terminal
    kinds = ["torch", "torch-int8", "onnx", "onnx-int8", "openvino", "openvino-int8"]
    assert summary["data"] == str(tiny_cifar.resolve())  # --data '': the dataset the teacher recorded
    weights = ["model.bin", "model.int8.bin"]  # OpenVINO's IR: the .xml's weights beside it
    assert sorted(p.name for p in out.iterdir()) == sorted([SIDECAR, *(EXPORT_FILES[k] for k in kinds), *weights])
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["files"] == {k: EXPORT_FILES[k] for k in kinds} and sidecar["parity"] == summary["parity"]
    for kind in kinds:
        p = summary["parity"][kind]
        assert p["images"] == 540
        assert p["agreement"] >= (0.995 if kind.endswith("int8") else 0.999), (kind, p)
        assert p["max_abs_logit_diff"] < (1e-3 if kind in ("torch", "onnx", "openvino") else 5.0), (kind, p)  # ~20
        assert abs(p["accuracy"] - p["source_accuracy"]) <= 1 - p["agreement"] + 1e-9

    model, _, _ = open_checkpoint(artifact)
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}
    assert summary["int8"]["student_grid_layers"] == {"torch-int8": len(layers), "onnx-int8": len(layers)}

    import onnx
    from onnx import numpy_helper

    int8_graph = onnx.load(str(out / EXPORT_FILES["onnx-int8"])).graph
    fp32 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out / EXPORT_FILES["onnx"])).graph.initializer}
    q8 = {i.name: numpy_helper.to_array(i) for i in int8_graph.initializer}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in int8_graph.node}
    for name, m in layers.items():  # the student's k-bit weights, exactly: int8 within 7 bits, else uint8 - 128
        w, codes, scale, zero = fp32[name], q8[f"{name}_quantized"], q8[f"{name}_scale"], q8[f"{name}_zero_point"]
        assert codes.dtype == (np.int8 if m.bits <= 7 else np.uint8), name
        shape = (-1, *[1] * (w.ndim - 1))
        assert np.array_equal((codes.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape), w), name
    assert int8_graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch axis
    program = torch.export.load(str(out / EXPORT_FILES["torch-int8"]))
    assert any("quantize_per_tensor" in str(n.target) for n in program.graph.nodes)

    images = _images(tiny_cifar, "train")
    source = load_deployable(artifact, device="cpu")
    expected = source.logits(images).argmax(1)
    t = read_payload(artifact)["temperature"]  # fitted on val when the artifact was measured
    assert sidecar["temperature"] == t == source.info.temperature and t != 1.0
    for kind in kinds:  # the round trip: each file opens by itself and predicts as the check measured
        loaded = load_deployable(out, device="cpu", kind=kind)
        assert (loaded.info.classes, loaded.info.mean) == (source.info.classes, source.info.mean)
        assert loaded.info.kind == kind and loaded.info.source == str((out / EXPORT_FILES[kind]).resolve())
        logits = loaded.logits(images)
        agreement = float((logits.argmax(1) == expected).mean())
        assert agreement == summary["parity"][kind]["agreement"]
        assert loaded.info.temperature == t  # what serve and predict scale by
        np.testing.assert_allclose(loaded.probabilities(images), softmax(logits / t), rtol=1e-5, atol=1e-7)
    assert load_deployable(out, device="cpu").info.kind == "torch"


def test_the_recorded_temperature_scales_probabilities_not_predictions(artifact, teacher, tiny_cifar):
    """The artifact's T (fitted on val by its measurement) divides the logits before the
    deployed softmax, leaving logits and top-1 alone; ``effray evaluate`` gives ECE and NLL
    before and after it. A training checkpoint records none and behaves as it always did."""
    t = read_payload(artifact)["temperature"]
    images = _images(tiny_cifar, "val")
    model = load_deployable(artifact, device="cpu")
    logits, probs = model.logits(images), model.probabilities(images)
    np.testing.assert_allclose(probs, softmax(logits / t), rtol=1e-5, atol=1e-7)
    assert np.array_equal(probs.argmax(1), logits.argmax(1)) and not np.allclose(probs, softmax(logits), atol=1e-3)
    # what `effray predict` writes and `effray serve` answers, from the same Deployable
    rows = Classifier(str(artifact), "", top_k=3, threads=1)(
        {
            "index": np.arange(len(images)),
            "name": np.array([""] * len(images), dtype=object),
            "label": np.zeros(len(images), np.int64),
            "error": np.array([""] * len(images), dtype=object),
            "resized_from": np.array([""] * len(images), dtype=object),
            "image": images,
        }
    )
    np.testing.assert_allclose(rows["probability"], probs.max(1), rtol=1e-5)
    served = answer(logits[0], model.calibrated(logits[:1])[0], model.info.classes, {}, None)
    np.testing.assert_allclose(list(served["probabilities"].values()), probs[0], rtol=1e-5)
    assert served["label"] == int(logits[0].argmax())
    plain = load_deployable(teacher, device="cpu")
    assert plain.info.temperature == 1.0
    np.testing.assert_allclose(plain.probabilities(images), softmax(plain.logits(images)), rtol=1e-6)

    rc, scores, err = cli("evaluate", "--checkpoint", str(artifact), "--data", str(tiny_cifar))
    assert rc == 0, err
    assert scores["temperature"] == t
    assert scores["nll_scaled"] <= scores["nll"] + 1e-4  # T was fitted by NLL on these very images
    assert 0 <= scores["ece_scaled"] <= 1
    rc, scores, err = cli("evaluate", "--checkpoint", str(teacher), "--data", str(tiny_cifar))
    assert rc == 0 and not {"temperature", "ece_scaled", "nll_scaled"} & set(scores), err


def test_a_file_that_fails_parity_is_not_written(tiny_cifar, teacher, tmp_path):
    """2-bit activations: the fp32 programs keep the artifact's activation quantizers and
    the torch int8 program its grids, so they agree; ONNX Runtime's uint8 can't clamp the
    2-bit grid of the first layer's (signed) input, and disagrees. The check catches it and nothing is left
    behind, the files written before it included."""
    cfg = CompressConfig(bits=4, act_bits=2, quant_mode="ptq", finetune_epochs=0, calib_batches=2, int8=False)
    art = _compress(tiny_cifar, teacher, tmp_path / "art2", cfg)

    def export_int8(out: str, **kw) -> dict:
        return export(
            validated(
                ExportConfig(
                    artifact=str(art), data=str(tiny_cifar), out=str(tmp_path / out), int8=True, calib_batches=1, **kw
                )
            )
        )

    with pytest.raises(
        EffrayError, match=r"model.int8.onnx failed the parity check: top-1 agreement 0\.\d+ < 0.999 .*2-bit"
    ):
        export_int8("deploy", format="onnx", min_int8_agreement=0.999)
    assert not (tmp_path / "deploy").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy")]
    # --int8-fallback: the int8 ONNX file is left out, and the OpenVINO int8 file converted from it; the fp32
    # files are written and deploy.json says why
    kept = export_int8("fallback", format="openvino", int8_fallback=True, min_int8_agreement=0.999)
    sidecar = json.loads((tmp_path / "fallback" / SIDECAR).read_text())
    assert set(kept["files"]) == set(sidecar["files"]) == {"onnx", "openvino"} == set(sidecar["parity"])
    failed = sidecar["int8"]["failed"]
    assert failed["onnx-int8"].startswith("model.int8.onnx failed the parity check") and "2-bit" in failed["onnx-int8"]
    assert failed["openvino-int8"] == "converted from model.int8.onnx, which was left out"
    assert not list((tmp_path / "fallback").glob("model.int8.*"))
    exact = export_int8("fp32", min_int8_agreement=1.0)
    assert exact["parity"]["torch-int8"]["agreement"] == 1.0
    assert exact["parity"]["torch"]["agreement"] == 1.0 and exact["parity"]["torch"]["max_abs_logit_diff"] < 1e-4
    # every layer int8 at full range, as written on a VNNI CPU: where the CPU has no VNNI the
    # loader runs it unlowered instead of overflowing oneDNN's int16 pair sums
    full = export_int8("full", int8_reduce_range="off", min_int8_agreement=1.0)
    assert full["int8"]["reduce_range"] is False and full["parity"]["torch-int8"]["agreement"] == 1.0


def test_onnx_int8_calibration_in_pieces_finds_the_ranges_of_whole_batches(tiny_cifar, teacher, tmp_path, monkeypatch):
    """A float model's int8 ONNX file, calibrated one image per run (a budget that holds one
    image's activations) and in whole 64-image batches: min and max over the pieces are the
    batch's, so every scale and zero point is the same."""
    import onnx
    from onnx import numpy_helper

    from effray.deploy import writers

    def int8_file(name: str) -> dict[str, np.ndarray]:
        cfg = ExportConfig(
            artifact=str(teacher), data=str(tiny_cifar), out=str(tmp_path / name), format="onnx", int8=True
        )
        export(validated(dataclasses.replace(cfg, batch_size=64, calib_batches=2, min_int8_agreement=0.0)))
        graph = onnx.load(str(tmp_path / name / EXPORT_FILES["onnx-int8"])).graph
        return {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    whole = int8_file("whole")
    monkeypatch.setattr(writers, "CALIBRATION_BYTES", 1)
    assert writers.calibration_rows(tmp_path / "whole" / EXPORT_FILES["onnx"], 1) == 1
    pieces = int8_file("pieces")
    scales = [n for n in whole if n.endswith("_scale") or n.endswith("_zero_point")]
    assert len(scales) > 10 and whole.keys() == pieces.keys()
    for name in scales:
        np.testing.assert_array_equal(whole[name], pieces[name], err_msg=name)


def test_onnx_int8_runs_a_students_grids_on_int8_kernels(tiny_cifar, teacher, tmp_path):
    """8-bit activations, 4-bit weights (8-bit first/last): ONNX Runtime's int8 model rounds
    where the student rounds, on its grids, and ORT fuses every layer into an int8 kernel
    (QLinearConv, QGemm), none left as DequantizeLinear + float Conv/Gemm."""
    import onnx
    import onnxruntime as ort

    cfg = CompressConfig(bits=4, act_bits=8, quant_mode="ptq", finetune_epochs=0, calib_batches=2, int8=False)
    art = _compress(tiny_cifar, teacher, tmp_path / "art8", cfg)
    out = tmp_path / "deploy"
    summary = export(
        validated(
            ExportConfig(
                artifact=str(art),
                data=str(tiny_cifar),
                out=str(out),
                format="onnx",
                split="train",
                int8=True,
                min_int8_agreement=0.995,
                calib_batches=1,
            )
        )
    )
    p = summary["parity"]["onnx-int8"]
    assert p["agreement"] >= 0.995 and p["max_abs_logit_diff"] < 0.1, p  # logits span ~20; ORT rounds the bias to int32
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / EXPORT_FILES["onnx-int8"]), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2, ops
    assert not {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"} & set(ops), ops


def test_effray_runs_export_stage_exports_the_front_and_resumes(artifact, tiny_cifar, tmp_path):
    """``effray run``'s last stage (:func:`effray.run.export_front`) on a report's results:
    every front model and the pick exported (the pick with int8 unless its check fails),
    nothing for a model off the front, a broken artifact reported without stopping the
    others, and a re-run keeps what was exported from the same artifact."""
    import pandas as pd

    from effray.run import export_front

    junk = tmp_path / "junk" / "model.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"not a checkpoint")
    results = tmp_path / "results.parquet"
    pd.DataFrame(
        {
            "trial_id": ["pick", "front", "off", "broken"],
            "artifact": [str(artifact), str(artifact), str(artifact), str(junk)],
            "pareto_bytes": [True, True, False, True],
        }
    ).to_parquet(results)
    out = tmp_path / "export"
    done = export_front(results, "pick", out, tiny_cifar)
    assert sorted(done) == ["broken", "front", "pick"]
    assert sorted(p.name for p in out.iterdir()) == ["exports.json", "front", "pick"]  # what was done, for a re-run
    assert "refusing to load" in done["broken"]["error"] and str(junk) in done["broken"]["error"]
    for tid in ("pick", "front"):
        sidecar = json.loads((out / tid / SIDECAR).read_text())
        assert sidecar["exported_from"] == str(artifact.resolve()) and {"torch", "onnx"} <= set(sidecar["files"])
        assert not done[tid]["error"]
    pick = json.loads((out / "pick" / SIDECAR).read_text())
    assert (
        done["pick"]["int8"] == ("onnx-int8" in pick["files"])
        and "onnx-int8" not in json.loads((out / "front" / SIDECAR).read_text())["files"]
    )
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}
    again = export_front(results, "pick", out, tiny_cifar)
    assert again == done  # the same outcome, an int8 file that failed its check included
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*")} == stamps  # nothing re-exported


def test_bad_inputs_are_one_line_and_write_nothing(artifact, tiny_cifar, tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint")
    out = tmp_path / "deploy"
    rc, summary, err = cli("export", "--artifact", str(junk), "--data", str(tiny_cifar), "--out", str(out))
    assert rc == 2 and summary is None
    assert len(err.strip().splitlines()) == 1 and "model.pt" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no --out, no temp sibling

    # an artifact that records no dataset that exists here, and no --data
    payload = read_payload(artifact)
    save_payload(tmp_path / "orphan", {**payload, "teacher": {}})
    with pytest.raises(EffrayError, match="records no dataset.*pass --data"):
        export(validated(ExportConfig(artifact=str(tmp_path / "orphan"), out=str(out))))
    # --out that holds something else
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(EffrayError, match="is not an `effray export` output"):
        export(validated(ExportConfig(artifact=str(artifact), data=str(tiny_cifar), out=str(tmp_path / "busy"))))
    assert not out.exists()


def test_a_dataset_of_another_kind_is_refused(artifact, tiny_cifar):
    _, _, info = open_checkpoint(artifact)
    meta = load_meta(tiny_cifar)
    check_dataset(meta, info, tiny_cifar)
    with pytest.raises(EffrayError, match="has 100 classes, the model predicts 10"):
        check_dataset({**meta, "num_classes": 100, "classes": [str(i) for i in range(100)]}, info, tiny_cifar)
    check_dataset({**meta, "image_shape": [64, 64, 3]}, info, tiny_cifar)  # resized by the model's preprocessing
    with pytest.raises(EffrayError, match=r"has \[32, 32, 1\] \(HWC\) images, the model takes \[32, 32, 3\]"):
        check_dataset({**meta, "image_shape": [32, 32, 1]}, info, tiny_cifar)


def test_a_searchs_deploy_probe_times_the_exported_file_beside_the_teacher_on_one_runtime(
    artifact, teacher, tiny_cifar, tmp_path
):
    """What every measured trial of a search gets (``--deploy openvino``): the teacher
    exported once in its fp32 form and timed on the driver; the trial's artifact exported
    and parity-checked as ``effray export`` does, then timed beside the teacher's file on
    the same runtime. Behaviour only: on a shared machine no speed is asserted."""
    import effray.deploy  # noqa: F401  (registers the probe with the search)

    spec = DeploySpec("openvino", (), 1, 16, 3)
    probe = deploy_probe(spec, str(teacher), str(tiny_cifar), str(tmp_path / "teacher-files"))
    t = probe.teacher
    assert (t["deploy"], t["deploy_kind"], t["runtime"], t["batch_N"], t["latency_threads"]) == (
        "openvino",
        "openvino",
        "openvino",
        16,
        1,
    )
    assert t["deployed_latency_ms_b1"] > 0 and t["deployed_img_s_bN"] > 0 and t["latency_cpu"].startswith("cpu")
    trial = tmp_path / "trial"
    shutil.copytree(artifact, trial)
    row = probe.measure(str(trial), str(tiny_cifar))
    assert row["runtime"] == "openvino" and row["deploy_agreement"] >= 0.999 and "deploy_error" not in row
    assert row["speedup_b1"] == pytest.approx(row["teacher_latency_ms_b1"] / row["latency_ms_b1"])
    assert row["speedup_bN"] == pytest.approx(row["img_s_bN"] / row["teacher_img_s_bN"])
    assert row["slower_than_teacher"] == (row["speedup_b1"] < 1 or row["speedup_bN"] < 1)
    assert (trial / "export" / "model.xml").is_file() and (trial / "export" / SIDECAR).is_file()


def test_deploy_auto_times_the_teachers_int8_file_where_the_cpu_has_vnni(teacher, tiny_cifar, tmp_path):
    """``--deploy auto``: without VNNI/AMX, ONNX Runtime fp32 by rule; with them, the teacher's
    int8 file is written and timed beside its fp32 one, and int8 is kept only if it is faster
    (the reason names the ratios). The teacher is timed in fp32 either way."""
    import effray.deploy  # noqa: F401  (registers the probe with the search)
    from effray.deploy.latency import where

    out = tmp_path / "teacher-files"
    probe = deploy_probe(DeploySpec("auto", (), 1, 16, 3), str(teacher), str(tiny_cifar), str(out))
    t, sidecar = probe.teacher, json.loads((out / SIDECAR).read_text())
    assert t["deploy"] == probe.kind and t["deploy_kind"] == "onnx" and t["runtime"] == "onnxruntime"  # fp32 timed
    if where()["vnni"]:  # one export: the fp32 file, and the int8 file beside it unless its parity check refused it
        assert "the teacher's int8 file" in t["deploy_why"] and probe.kind in ("onnx", "onnx-int8")
        written = "onnx-int8" in sidecar["files"]
        assert written == ("at batch 1" in t["deploy_why"]) == (out / "model.int8.onnx").is_file(), t["deploy_why"]
        assert written or sidecar["int8"]["failed"]["onnx-int8"] == t["deploy_int8_error"]
    else:
        assert probe.kind == "onnx" and "no VNNI/AMX" in t["deploy_why"] and set(sidecar["files"]) == {"onnx"}
    probe.close()
