"""The files ``effray export`` writes, one writer per kind: a ``torch.export`` program
(``.pt2``, fp32 or PT2E int8), ONNX (fp32, or ONNX Runtime's static QDQ int8 on the
student's own grids) and OpenVINO's IR converted from those ONNX files, so a second runtime
runs the very graph ONNX Runtime runs. :func:`write_export` picks the writer;
:mod:`effray.deploy.export` checks each file once it is written."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.compress.fakequant import ActQuant, QLinear
from effray.compress.int8 import quantize_int8
from effray.compress.program import export_program, quiet
from effray.deploy.model import EXPORT_FILES
from effray.errors import EffrayError
from effray.models.reference import is_reference

INPUT, OUTPUT = "image", "logits"  # the ONNX graph's tensor names
# ops between a layer and the next one's input that commute with rounding on one grid
# (a grid that holds 0 for ReLU): the next layer's input grid can round there instead
_COMMUTING = ("Relu", "MaxPool", "Reshape", "Flatten")
# what one run of ORT's min/max calibration graph may hold: it reduces every tensor of the
# model, and ORT keeps them all alive for that (docs/design.md#export-parity)
CALIBRATION_BYTES = 1 << 30


@dataclass(frozen=True)
class ExportSources:
    """What every file is written from, built once per export."""

    model: Any  # the artifact's own module (fake-quant layers and all): PT2E int8 starts from it
    program: Any  # its float twin with the activation quantizers kept: the fp32 files compute what it computes
    plain: Any  # the plain float twin's program (None unless ONNX int8 is asked for): its QDQ nodes round instead
    example: Any  # normalised float32 NCHW images to trace with (two: the batch axis stays dynamic)
    calib: list[np.ndarray]  # normalised training batches that calibrate what the student doesn't fix
    steps: dict[str, list[float]]  # a student layer's per-channel weight step, by weight name
    grids: dict[str, tuple[float, int, int]]  # a student layer's input grid: scale, zero point, bits


def write_export(kind: str, path: Path, src: ExportSources, reduce_range: bool, calib_batches: int) -> int | None:
    """Write ``kind`` to ``path``; an int8 file returns how many student layers keep their
    k-bit grid in it, an fp32 file None."""
    import torch

    if kind == "torch":
        write_torch(path, src.program)
        return None
    if kind == "onnx":
        write_onnx(path, src.program, src.example)
        return None
    if kind in ("openvino", "openvino-int8"):  # the ONNX file of the same precision is written before it
        write_openvino(path, path.with_name(EXPORT_FILES[kind.replace("openvino", "onnx")]))
        return None
    if kind == "torch-int8":
        int8 = quantize_int8(
            src.model,
            [(torch.from_numpy(x), None) for x in src.calib],
            max_batches=calib_batches,
            reduce_range=reduce_range,
        )
        write_torch(path, export_program(int8, src.example))
        return int(int8.meta.get("student_grid_layers", 0))
    base = path.with_name(".float-twin.onnx")
    try:
        write_onnx(base, src.plain, src.example)
        only_layers = is_reference(str((getattr(src.model, "spec", None) or {}).get("name", "")))
        linears = student_linears(src.model) if only_layers else None
        return write_onnx_int8(path, base, src.calib, src.steps, src.grids, reduce_range, only_layers, linears)
    finally:
        base.unlink(missing_ok=True)


def student_linears(model: Any) -> dict[str, np.ndarray]:
    """Each fake-quant linear's weight as the float twin holds it (dequantized), by name."""
    import torch

    with torch.no_grad():
        return {
            f"{n}.weight": m.qweight().detach().float().cpu().numpy()
            for n, m in model.named_modules()
            if isinstance(m, QLinear)
        }


@contextlib.contextmanager
def _silent() -> Any:
    """The exporters print progress and warnings: none of it belongs on the user's terminal."""

    with quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def write_torch(path: Path, program: Any) -> None:
    import torch

    torch.export.save(program, str(path))


def write_onnx(path: Path, program: Any, example: Any) -> None:
    import torch

    try:
        with _silent():
            torch.onnx.export(
                program,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                external_data=False,
                optimize=True,
            )
    except Exception as exc:  # noqa: BLE001 - the ONNX exporter raises many kinds
        raise EffrayError(
            f"the ONNX exporter failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}"
        ) from None
    drop_identity_pools(path)


def drop_identity_pools(path: Path) -> int:
    """Remove the ``AveragePool`` nodes that copy their input (1x1 windows, stride 1, no
    padding: an ``AdaptiveAvgPool2d`` to the size it is given), rewiring their consumers.
    Free in fp32, such a node costs a full pass in ONNX Runtime's int8 graph (its
    ``QLinearAveragePool`` runs for real). Returns how many were removed."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    outputs = {o.name for o in graph.output}

    def copies(node: Any) -> bool:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        return (
            node.op_type == "AveragePool"
            and all(k == 1 for k in a.get("kernel_shape", [0]))
            and all(v == 1 for v in a.get("strides", [1]))
            and not any(a.get("pads", []))
            and node.output[0] not in outputs
        )

    dropped = [n for n in graph.node if copies(n)]
    for node in dropped:
        source, target = node.input[0], node.output[0]
        for other in graph.node:
            other.input[:] = [source if i == target else i for i in other.input]
        graph.node.remove(node)
    if dropped:
        onnx.save(model, str(path))
    return len(dropped)


def write_openvino(path: Path, onnx_path: Path) -> None:
    """OpenVINO's IR (``path``: the ``.xml``, its weights in the ``.bin`` beside it) of an
    ONNX file, read by OpenVINO's ONNX frontend and saved with fp32 weights (``save_model``
    would halve them to fp16 by default). Not through ``convert_model``: its graph passes
    turn a division by a constant into a multiplication by its reciprocal, which rounds
    differently for a value near a rounding boundary of an activation quantizer, so the
    file would compute another model (``runtimes.openvino_model`` keeps divisions exact)."""
    import openvino as ov

    try:
        with _silent():
            ov.save_model(ov.Core().read_model(str(onnx_path)), str(path), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EffrayError(f"OpenVINO could not convert {onnx_path.name}: {first}") from None


def _identity_pool(node: Any) -> bool:
    """An ``AveragePool`` over 1x1 windows (``AdaptiveAvgPool2d`` to the size it is given)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return node.op_type == "AveragePool" and all(k == 1 for k in attrs.get("kernel_shape", [0]))


def onnx_overrides(
    onnx_path: Path,
    steps: dict[str, Any],
    grids: dict[str, tuple[float, int, int]],
    aliases: dict[str, str] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """ONNX Runtime ``TensorQuantOverrides`` that make its int8 model round where the student
    rounds, on the student's grids; returns them and how many layers' weights they pin.

    * Weights: each student layer's per-channel step is the int8 scale, so the codes are
      its k-bit codes. Codes beyond 7 bits (the 8-bit first and last layers) are stored
      uint8 with zero point 128: ONNX Runtime's x86 kernels without VNNI sum uint8 x int8
      pairs in int16, which overflows at full range, while its uint8 x uint8 kernels widen
      first. Codes within 7 bits stay int8 (fast everywhere).
    * Activations: a layer's input tensor takes the student's activation scale and zero
      point (``grids``), and so do the tensors upstream of it through ReLU, max-pool and
      reshapes back to the previous layer's output, which ORT must quantize to fuse its
      int8 kernel: rounding there, on the same grid, equals rounding at the input. A grid
      of ``2^k`` levels (k < 8) is placed at the top of the uint8 range (zero point
      ``255 - (2^k - 1 - zero)``) so uint8 saturation is the student's clamp; that is exact
      for the non-negative inputs that follow a ReLU.

    ``aliases``: the exporter's names for weights it stored transposed (a linear on 3-D
    input becomes ``MatMul(x, W^T)``) -> the student's weight names."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(onnx_path)).graph
    weights = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    out: dict[str, list[dict[str, Any]]] = {}
    pinned = 0
    for node in graph.node:
        onnx_name = node.input[1] if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else ""
        name = (aliases or {}).get(onnx_name, onnx_name)
        if name in grids and grids[name][2] <= 8:
            scale, zero, bits = grids[name]
            chain, tensor, rectified = [], node.input[0], False
            while True:
                chain.append(tensor)
                up = producer.get(tensor)
                if up is None or not (up.op_type in _COMMUTING or _identity_pool(up)):
                    break
                rectified |= up.op_type == "Relu"
                tensor = up.input[0]
            top = 2**bits - 1 - zero
            zero_point = 255 - top if rectified and bits < 8 else zero
            for t in chain:
                out[t] = [
                    {
                        "scale": np.array(scale, np.float32),
                        "zero_point": np.array(zero_point, np.uint8),
                        "quant_type": QuantType.QUInt8,
                    }
                ]
        if name not in steps or onnx_name not in weights:
            continue
        w, step = numpy_helper.to_array(weights[onnx_name]), np.asarray(steps[name], np.float32)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if node.op_type == "Conv" or trans_b else w.ndim - 1
        if w.shape[axis] != len(step):
            continue
        codes = w / step.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        if np.abs(codes).max() > 127 or not np.array_equal(codes, np.round(codes)):
            continue
        wide = np.abs(codes).max() > 63
        out[onnx_name] = [
            {
                "axis": axis,
                "scale": float(v),
                "zero_point": 128 if wide else 0,
                **({"quant_type": QuantType.QUInt8} if wide else {}),
            }
            for v in step
        ]
        pinned += 1
    return out, pinned


def write_onnx_int8(
    path: Path,
    fp32: Path,
    calib: list[np.ndarray],
    steps: dict[str, Any],
    grids: dict[str, tuple[float, int, int]],
    reduce_range: bool,
    only_layers: bool = False,
    weights: dict[str, np.ndarray] | None = None,
) -> int:
    """Static QDQ after ORT's pre-processing: per-channel symmetric weights, uint8
    activations; a student's layers on its own grids (:func:`onnx_overrides`), anything
    else calibrated by min/max on ``calib`` (``reduce_range``: 7-bit weights, for CPUs
    without VNNI). Linear layers keep float outputs (ORT's ``QGemm`` takes that), so the
    logits are not rounded to 8 bits. ``only_layers`` (a model built by reference: a ViT's
    attention products, adds and norms): only the convs and linears are quantized, the
    student's rounding points, and nothing between them; ``weights`` (the student's linear
    weights, by name) find the ones the exporter stored transposed. Returns how many
    student layers keep their grid."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (x[i : i + rows] for x in calib for i in range(0, len(x), rows))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {INPUT: x}

    pre = path.with_name(path.stem + ".pre.onnx")
    try:
        with _silent():
            quant_pre_process(str(fp32), str(pre))
            rows = calibration_rows(pre, CALIBRATION_BYTES)
            overrides, pinned = onnx_overrides(pre, steps, grids, transposed_weights(pre, weights) if weights else None)
            layers = layer_nodes(pre) if only_layers else None
            quantize_static(
                str(pre),
                str(path),
                Calibration(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                **({"nodes_to_quantize": layers} if layers is not None else {}),
                extra_options={
                    "TensorQuantOverrides": overrides,
                    "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                },
            )
    finally:
        pre.unlink(missing_ok=True)
    return pinned


def calibration_rows(onnx_path: Path, budget: int) -> int:
    """Images per calibration run, at least one. Min/max calibration adds a ReduceMin and a
    ReduceMax on every tensor, and ORT keeps each tensor alive until both have run: a run
    holds about every activation of the model at once, twice their sum in its arena. A
    ResNet-50 at 224 px would take ~60 GB for a batch of 256. Min and max over the pieces
    are those of the whole batch, so the ranges are the same."""
    import onnx

    per_image = 0
    for value in onnx.load(str(onnx_path), load_external_data=False).graph.value_info:
        dims = value.type.tensor_type.shape.dim[1:]  # after the batch dimension
        if all(d.HasField("dim_value") for d in dims):
            per_image += 4 * int(np.prod([d.dim_value for d in dims]))
    return max(1, budget // max(1, 2 * per_image))


def transposed_weights(onnx_path: Path, weights: dict[str, np.ndarray]) -> dict[str, str]:
    """``{onnx initializer: student weight name}`` for each 2-D initializer that is a student
    linear's weight transposed (found by value: the exporter names it ``val_N``)."""
    import onnx
    from onnx import numpy_helper

    by_value = {(w.T.shape, np.ascontiguousarray(w.T).tobytes()): n for n, w in weights.items() if w.ndim == 2}
    out = {}
    for init in onnx.load(str(onnx_path)).graph.initializer:
        if len(init.dims) == 2:
            a = numpy_helper.to_array(init)
            name = by_value.get((a.shape, np.ascontiguousarray(a, np.float32).tobytes()))
            if name is not None:
                out[init.name] = name
    return out


def layer_nodes(onnx_path: Path) -> list[str]:
    """The graph's conv and linear nodes (a ``Conv``/``Gemm``/``MatMul`` with a weight): not an
    activation-by-activation product such as attention's ``q @ k``."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    weights = {i.name for i in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in weights
    ]


def why_int8_disagrees(model: Any, kind: str) -> str:
    """A likely cause of an ONNX int8 file's disagreement: an activation grid of fewer than
    8 bits, which uint8 holds exactly only after a ReLU (where its clamp is uint8's
    saturation); on a signed input, such as the image, it rounds but can't clamp."""

    bits = sorted({m.bits for m in model.modules() if isinstance(m, ActQuant)})
    if kind != "onnx-int8" or not bits or bits[0] >= 8:
        return ""
    return (
        f" (the artifact quantizes activations to {bits[0]}-bit; ONNX Runtime's uint8 clamps such a grid only "
        "after a ReLU)"
    )
