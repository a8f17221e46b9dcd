"""The two runtimes besides torch that run effray's exports, each opened one way.

An ONNX Runtime session (:func:`ort_session`) and an OpenVINO compiled model
(:func:`openvino_model`) are made here for :func:`effray.deploy.model.load_deployable`
(predict, serve, export's parity check) and for the latency measurement
(:mod:`effray.deploy.latency`) alike, so what is timed is what is served: the runtime's own
graph optimisations on, at a fixed thread count. ``threads=0`` leaves the count to the
runtime (all cores), as a server wants; a measurement fixes it, so that two models are
timed on the same share of the CPU.
"""

from __future__ import annotations

import os
from typing import Any

from effray.errors import EffrayError

# OpenVINO's runtime attribute that keeps a Divide from becoming a multiplication by the reciprocal
# (ov::disable_divide_conversion); runtime info is not saved in the IR, so it is set at every load
EXACT_DIVIDE = "nonconvertable_divide_0"
# an export kind -> the runtime that runs it
RUNTIME_OF = {
    "torch": "torch",
    "torch-int8": "torch",
    "onnx": "onnxruntime",
    "onnx-int8": "onnxruntime",
    "openvino": "openvino",
    "openvino-int8": "openvino",
}


def ort_session(path: str | os.PathLike, threads: int = 0, cuda: bool = False) -> Any:
    """An ONNX Runtime session of ``path`` with every graph optimisation on (constant
    folding, node fusions, layout changes): what ORT does for a deployed model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(
            str(path), opts, providers=[p for p in wanted if p in ort.get_available_providers()]
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise EffrayError(
            f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0][:200]}); re-run `effray export`"
        ) from None


def openvino_model(path: str | os.PathLike, threads: int = 0) -> Any:
    """An OpenVINO model (``.xml`` beside its ``.bin``) compiled for the CPU: one stream,
    the latency hint, and fp32 inference, which OpenVINO would otherwise lower to bf16 on a
    CPU with AMX or AVX512-BF16 (and so disagree with the file). Its divisions stay
    divisions: by default OpenVINO multiplies by the reciprocal instead, which rounds the
    other way for a value near an activation quantizer's rounding boundary (every image
    whose pixel normalises to such a value, when the first layer quantizes its input)."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        core = ov.Core()
        model = core.read_model(str(path))
        for op in model.get_ops():
            if op.get_type_name() == "Divide":
                op.get_rt_info()[EXACT_DIVIDE] = True
        return core.compile_model(model, "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        raise EffrayError(
            f"{path} is not a loadable OpenVINO model ({str(exc).strip().splitlines()[0][:200]}); re-run "
            "`effray export --format openvino`"
        ) from None
