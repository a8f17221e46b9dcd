"""The deployed latency, without Ray: exported files timed side by side on their runtimes,
the fields a trial's row carries (speed-ups against the teacher on the same runtime, a
slower model marked, one set per target), OpenVINO rounding as ONNX Runtime does at a
quantizer's rounding boundary, and bad deploy flags failing in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from helpers import cli

from effray.compress.config import CompressConfig
from effray.compress.cost import epoch_costs, predict_costs
from effray.compress.program import export_program, float_twin
from effray.compress.recipe import compress_local
from effray.config import validated
from effray.deploy.latency import ExportedFile, Measured, Timing, time_exports
from effray.deploy.probe import auto_choice, resolve_kind, row_fields
from effray.deploy.runtimes import openvino_model, ort_session
from effray.deploy.writers import write_onnx, write_openvino
from effray.models import build_model
from effray.run.front import front_table, pick_lines, serve_kind, target_lines
from effray.search.aggregate import write_report
from effray.search.deployed import DeploySpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _onnx(tmp_path, width: float) -> ExportedFile:
    torch.manual_seed(0)
    model = build_model("convnet", 10, 3, width).eval()
    example = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"w{width}.onnx"
    write_onnx(path, export_program(float_twin(model), example), example)
    return ExportedFile("onnx", {"model.onnx": path.read_bytes()}, (32, 32, 3), False)


def test_files_are_timed_side_by_side_on_their_runtimes(tmp_path):
    teacher, student = _onnx(tmp_path, 0.5), _onnx(tmp_path, 0.25)
    write_openvino(tmp_path / "model.xml", tmp_path / "w0.25.onnx")
    ir = ExportedFile(
        "openvino",
        {n: (tmp_path / n).read_bytes() for n in ("model.xml", "model.bin")},
        (32, 32, 3),
        False,
    )
    m = time_exports([teacher, student, ir], threads=1, batch=8, repeats=3)
    assert [(t.kind, t.runtime) for t in m.timings] == [
        ("onnx", "onnxruntime"),
        ("onnx", "onnxruntime"),
        ("openvino", "openvino"),
    ]
    assert all(t.latency_ms_b1 > 0 and t.img_s_bN > 0 for t in m.timings)
    # this process's node: none outside Ray (a test before this one may have started Ray in this worker)
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    assert (m.threads, m.batch, m.node) == (1, 8, here)
    assert m.cpu.startswith("cpu capability") and isinstance(m.vnni, bool)


def _measured(teacher: tuple[float, float], student: tuple[float, float], node: str) -> Measured:
    timings = tuple(Timing("onnx", "onnxruntime", ms, img_s) for ms, img_s in (teacher, student))
    return Measured(timings, node, "cpu capability AVX2", False, 1, 256)


def test_a_rows_speedups_are_against_the_teacher_in_the_same_run_and_a_slower_model_is_marked():
    spec = DeploySpec("onnx", (), 1, 256, 30)
    fast = row_fields({"local": _measured((1.0, 1000.0), (0.5, 2500.0), "n1")}, spec)
    assert fast["speedup_b1"] == pytest.approx(2.0) and fast["speedup_bN"] == pytest.approx(2.5)
    assert fast["teacher_latency_ms_b1"] == 1.0 and fast["batch_N"] == 256 and not fast["slower_than_teacher"]
    assert not any("@" in k for k in fast)  # no --latency-on: no per-target columns
    slower_at_n = row_fields({"local": _measured((1.0, 1000.0), (0.8, 900.0), "n1")}, spec)
    assert slower_at_n["slower_than_teacher"] and slower_at_n["speedup_b1"] == pytest.approx(1.25)

    targets = DeploySpec("onnx", ("cpu_box", "edge"), 1, 256, 30)
    rows = row_fields(
        {"cpu_box": _measured((1.0, 1000.0), (0.5, 2000.0), "n1"), "edge": _measured((4.0, 100.0), (5.0, 90.0), "n2")},
        targets,
    )
    assert rows["latency_ms_b1"] == rows["latency_ms_b1@cpu_box"] == 0.5  # the first target's, unsuffixed
    assert rows["latency_node@edge"] == "n2" and rows["slower_than_teacher@edge"]
    assert not rows["slower_than_teacher@cpu_box"] and rows["speedup_b1@edge"] == pytest.approx(0.8)


def test_auto_picks_int8_only_where_the_cpu_has_vnni_or_amx_and_says_why():
    assert resolve_kind("auto", int8_native=True)[0] == "onnx-int8"
    kind, why = resolve_kind("auto", int8_native=False)
    assert kind == "onnx" and "VNNI" in why
    assert resolve_kind("openvino-int8", int8_native=False) == ("openvino-int8", resolve_kind("pt2-int8", False)[1])
    assert "without VNNI" in resolve_kind("pt2-int8", int8_native=False)[1]
    assert resolve_kind("openvino", int8_native=False) == ("openvino", "")


def test_auto_keeps_int8_on_a_vnni_cpu_only_where_the_teachers_int8_file_is_faster_everywhere():
    """The teacher's fp32 and int8 files timed together on each target: int8 must win at batch 1
    on all of them, and the reason carries the measured ratios; an int8 file its parity check
    refused leaves fp32, and the reason says why."""
    kind, why = auto_choice({"local": _measured((0.05, 24000.0), (0.07, 17000.0), "n1")})
    assert kind == "onnx" and "0.71x at batch 1, 0.71x at batch N" in why
    kind, why = auto_choice({"local": _measured((0.10, 10000.0), (0.05, 30000.0), "n1")})
    assert kind == "onnx-int8" and "2.00x at batch 1, 3.00x at batch N" in why
    both = {"a": _measured((0.10, 1e4), (0.05, 3e4), "n1"), "b": _measured((0.10, 1e4), (0.20, 3e4), "n2")}
    kind, why = auto_choice(both)
    assert kind == "onnx" and "0.50x at batch 1, 3.00x at batch N on b" in why
    failed = "model.int8.onnx failed the parity check: top-1 agreement 0.9850 < 0.995"
    kind, why = auto_choice(None, f"{failed} with the source on 1000 val images (max |logit diff| 0.106)")
    assert kind == "onnx" and why == f"auto: ONNX Runtime fp32 (the teacher's int8 file was not written: {failed})"


def test_openvino_rounds_a_value_on_a_quantizers_boundary_as_onnx_runtime_does(tmp_path):
    """x / s for x = (k + 1/2) s: the float nearest lands on either side of the boundary.
    OpenVINO's own graph passes would multiply by 1/s there, which rounds some of these the
    other way (every image holding a pixel that normalises to such a value would differ)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    s = np.float32(0.016071658581495285)  # a demo student's input step
    x = ((np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)) * s).reshape(1, 1, 16, 16)
    graph = helper.make_graph(
        [helper.make_node("Div", ["image", "s"], ["d"]), helper.make_node("Round", ["d"], ["logits"])],
        "quantizer",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 1, 16, 16])],
        [numpy_helper.from_array(np.array(s), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "q.onnx"))
    write_openvino(tmp_path / "q.xml", tmp_path / "q.onnx")
    assert 'type="Divide"' in (tmp_path / "q.xml").read_text()  # the IR keeps the division
    want = np.round(x / s)
    assert np.array_equal(ort_session(tmp_path / "q.onnx", 1).run(None, {"image": x})[0], want)
    assert np.array_equal(openvino_model(tmp_path / "q.xml", 1).create_infer_request().infer({0: x})[0], want)


def test_bad_deploy_flags_fail_in_one_line_before_anything_runs(tmp_path):
    base = ["tune", "--teacher", str(tmp_path), "--data", str(tmp_path), "--storage", str(tmp_path / "runs")]
    for flags, said in (
        (["--deploy", "tflite"], "--deploy must be one of auto, onnx"),
        (["--latency-on", "cpu,,edge"], "empty resource name"),
        (["--latency-on", "cpu,cpu"], "names a resource twice"),
        (["--deploy", "off", "--latency-on", "cpu"], "drop --deploy off"),
        (["--latency-batch", "0"], "--latency-batch must be a positive integer"),
    ):
        rc, _, err = cli(*base, *flags)
        assert rc == 2 and said in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not (tmp_path / "runs").exists()


def test_the_front_table_and_the_report_mark_a_model_slower_than_the_teacher(tmp_path):
    rows = [
        {"trial_id": "fast", "accuracy": 0.60, "bytes": 20_000, "macs": 1e5, "latency_ms": 0.05, "speedup_b1": 2.0},
        {"trial_id": "slow", "accuracy": 0.65, "bytes": 40_000, "macs": 4e5, "latency_ms": 0.20, "speedup_b1": 0.5},
    ]
    df = pd.DataFrame(rows).assign(
        speedup_bN=[3.0, 0.7],
        slower_than_teacher=[False, True],
        batch_N=256,
        runtime="onnxruntime",
        img_s_bN=[9e3, 2e3],
        **{  # two --latency-on targets: the table's (first) and edge, where "slow" is the faster
            "speedup_b1@inference": [2.0, 0.5],
            "speedup_b1@edge": [1.0, 2.0],
            "speedup_bN@edge": [1.5, 2.5],
            "latency_ms_b1@edge": [0.1, 0.05],
        },
    )
    teacher = {
        "accuracy": 0.66,
        "bytes": 500_000,
        "macs": 1.7e6,
        "latency_ms": 0.1,
        "deployed_latency_ms_b1": 0.1,
        "deployed_img_s_bN": 3e3,
        "deploy": "onnx",
        "deploy_kind": "onnx",
        "runtime": "onnxruntime",
        "latency_threads": 1,
        "batch_N": 256,
        "latency_cpu": "cpu capability AVX2",
    }
    write_report(df, tmp_path, teacher)
    lines = front_table(tmp_path / "results.parquet", teacher, pick="slow")
    assert "x b1" in lines[0] and "x b256" in lines[0]
    (fast,) = [ln for ln in lines if "fast" in ln]
    (slow,) = [ln for ln in lines if "slow " in ln]
    assert slow.startswith(" *") and slow.rstrip().endswith("slower") and "0.50x" in slow
    assert "slower" not in fast and "2.00x" in fast and "3.00x" in fast
    # the first target's speed-ups are the table's; each further target gets one line
    assert target_lines(tmp_path / "results.parquet") == [
        "  on edge (x b1 / x bN against the teacher there): fast 1.00x/1.50x, slow 2.00x/2.50x"
    ]
    table = pd.read_parquet(tmp_path / "results.parquet").set_index("trial_id")
    assert table["pareto_latency_ms"].all()  # one front per target: both here, "slow" alone on edge
    assert table["pareto_latency_ms_b1@edge"].to_dict() == {"slow": True, "fast": False}
    report = (tmp_path / "report.md").read_text()
    assert "beside the teacher's fp32 onnx file" in report and report.count("| slower |") == 1


def test_an_epochs_latency_is_measured_on_its_artifact_once_the_weights_are_final(tmp_path):
    """``--objective latency``: the rungs rank by the MAC-scaled estimate until the weights
    take their final form (pruned, then quantized at epoch 1), then by what the deployed
    file measures (here a stand-in that records the artifact it was handed)."""
    cfg = validated(
        CompressConfig(prune_rate=0.5, bits=4, int8=False, calib_batches=1, finetune_batch_size=32, finetune_epochs=2)
    )
    torch.manual_seed(0)
    model = build_model("convnet", 10, width=0.25).eval()
    predicted = {f"predicted_{k}": v for k, v in predict_costs(model, cfg).items()}
    predicted["predicted_latency_ms"] = 9.0
    g = torch.Generator().manual_seed(0)
    train = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    handed, costs = [], {}

    def latency(artifact_dir: str) -> float:
        handed.append(sorted(p.name for p in Path(artifact_dir).iterdir()))
        return 0.25

    def on_epoch(epoch, student, progress):
        student(train[0][0])
        costs[epoch] = epoch_costs(predicted, student, cfg, epoch, model.spec, latency=latency)

    compress_local(
        model,
        cfg,
        lambda e: train,
        train[:1],
        train[:1],
        tmp_path,
        log=lambda line: None,
        teacher_metrics={},
        on_epoch=on_epoch,
    )
    assert (costs[0]["latency_from"], costs[0]["predicted_latency_ms"]) == ("macs", 9.0)  # QAT starts at epoch 1
    assert (costs[1]["latency_from"], costs[1]["predicted_latency_ms"]) == ("export", 0.25)
    assert costs[1]["bytes_from"] == "weights" and handed == [["model.pt"]]  # the artifact as saved, timed once
    assert "latency_from" not in epoch_costs(predicted, model, cfg, 1, model.spec)  # no --objective latency


def test_an_average_pool_that_copies_its_input_leaves_the_onnx_file(tmp_path):
    """``AdaptiveAvgPool2d`` to the size it is given exports as a 1x1 ``AveragePool``: free in
    fp32, a full ``QLinearAveragePool`` pass in ONNX Runtime's int8 graph. The writer removes
    it (the file computes the same); a 1x1 pool with stride 2 subsamples and stays."""
    import onnx
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(8),
        nn.AvgPool2d(1, stride=2),
        nn.Flatten(),
        nn.Linear(64, 2),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    write_onnx(tmp_path / "m.onnx", torch.export.export(model, (x,)), x)
    pools = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "AveragePool"]
    assert len(pools) == 1 and [a.ints for a in pools[0].attribute if a.name == "strides"] == [[2, 2]]
    got = ort_session(tmp_path / "m.onnx", 1).run(None, {"image": x.numpy()})[0]
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-5)


def test_the_picks_serve_line_names_the_onnx_file_the_search_deployed():
    """int8 when it was written, unless --deploy chose fp32 (auto measured it faster here)."""
    assert serve_kind(True, {"deploy": "onnx-int8"}) == "onnx-int8"
    assert serve_kind(True, {"deploy": "onnx"}) == "onnx"  # auto: the teacher's int8 file was slower
    assert serve_kind(False, {"deploy": "onnx-int8"}) == "onnx"  # the pick's int8 file failed its check
    assert serve_kind(True, None) == "onnx-int8" and serve_kind(True, {}) == "onnx-int8"  # --deploy off


def test_a_pick_without_a_deployable_file_is_served_from_its_artifact(tmp_path):
    """No file of the pick passed its parity check (nothing was written to its export
    directory): the serve and predict lines name its artifact, and a line says why, instead
    of a directory that does not exist."""
    exported = {"dir": str(tmp_path / "export" / "t1"), "int8": True, "error": "", "artifact": "/runs/t1/ckpt"}
    lines = pick_lines(exported, {"deploy": "onnx-int8"}, "data.parquet", tmp_path / "predictions")
    assert lines == [
        f"serve the pick:   effray serve --model {tmp_path}/export/t1 --kind onnx-int8",
        f"batch inference:  effray predict --model {tmp_path}/export/t1 --kind onnx-int8 --data data.parquet "
        f"--out {tmp_path}/predictions",
    ]
    failed = {**exported, "error": "model.onnx failed the parity check: top-1 agreement 0.9875 < 0.999"}
    first, serve, predict = pick_lines(failed, {"deploy": "onnx-int8"}, "data.parquet", tmp_path / "predictions")
    assert "failed their parity check" in first and "artifact in PyTorch" in first
    assert serve == "serve the pick:   effray serve --model /runs/t1/ckpt" and "--kind" not in predict
    assert predict.startswith("batch inference:  effray predict --model /runs/t1/ckpt --data data.parquet")
