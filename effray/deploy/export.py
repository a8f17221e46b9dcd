"""``effray export``: a compressed artifact (or checkpoint) as a deployable program, checked.

What gets exported is the model's float twin (:func:`effray.compress.int8.float_twin`: BN
is already folded in artifacts, fake-quant layers become their dequantized weights; in
the fp32 files a quantized activation stays the same divide-clamp-round-multiply it is in
the artifact, so they compute what it computes), as a program taking normalised float32
NCHW batches of any size (``deploy.json`` holds the
normalisation, classes and provenance; :func:`effray.deploy.model.load_deployable` opens it):

* ``torch``: ``model.pt2``, a ``torch.export`` program (``torch.export.save``);
* ``torch-int8`` (``--int8``): ``model.int8.pt2``, the PT2E int8 program (torchao's x86
  quantizer, :func:`effray.compress.int8.quantize_int8`) as q/dq ops on int8 weights. The
  oneDNN-lowered module can't be saved (its prepacked weights are opaque), so the portable
  q/dq program is what is written; ``load_deployable`` lowers it to oneDNN int8 kernels on
  an x86 CPU when it opens it (elsewhere it runs as float arithmetic on the int8 values);
* ``onnx``: ``model.onnx`` (torch.export-based exporter, dynamic batch axis);
* ``onnx-int8`` (``--int8``): ``model.int8.onnx``, static QDQ from ONNX Runtime
  (per-channel int8 weights, uint8 activations; what the student doesn't fix is calibrated
  on the training split).

Both int8 files compute a compressed student on its own grids: its k-bit weights exactly
(its per-channel step as the int8 scale) and its activations rounded where it rounds them,
to its scale and zero point (:func:`effray.compress.int8.quantize_int8`,
:func:`onnx_overrides`). A CPU without VNNI sums uint8 x int8 pairs in int16, which
overflows at full range: there ``--int8-reduce-range auto`` keeps the torch program's
8-bit-weight layers float, and the ONNX file always stores codes beyond 7 bits as uint8
(ORT's uint8 x uint8 kernels widen first), so the same file is exact on either CPU;
``deploy.json`` records which.

Every file is loaded back once written and run beside the source on the held-out split:
top-1 agreement must reach ``--min-agreement`` (fp32) / ``--min-int8-agreement``, else
the command fails naming the figure and writes nothing. The source is run as
``load_deployable`` runs an artifact: fp32, its own (fake-quant) layers; a training
checkpoint is compared without its test-time augmentation, which no exported graph holds.
Everything is written to a temporary sibling of ``--out`` and renamed in at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effray.atomic import replace_dir, temp_sibling
from effray.compress.int8 import activation_grids, export_program, float_twin, quantize_int8, quiet, vnni, weight_steps
from effray.compress.quantize import ActQuant
from effray.config import option, require
from effray.data.arrays import prepared_batches
from effray.data.prepare import load_meta
from effray.deploy.model import EXPORT_FILES, SIDECAR, load_deployable, normalise, open_checkpoint, write_sidecar
from effray.errors import EffrayError
from effray.train.checkpoint import read_payload

FORMATS = {"torch": ("torch",), "onnx": ("onnx",), "all": ("torch", "onnx")}
INPUT, OUTPUT = "image", "logits"  # the ONNX graph's tensor names


@dataclass(frozen=True)
class ExportConfig:
    """Which model to export, to what, checked against which data."""

    artifact: str = option("", "compressed artifact or training checkpoint (directory or model.pt)")
    format: str = option(
        "torch", "torch: a torch.export program (.pt2); onnx: ONNX (fp32); all: both", choices=tuple(FORMATS)
    )
    int8: bool = option(
        False, "also write the int8 model: torchao PT2E (x86) for torch, onnxruntime static QDQ for onnx"
    )
    out: str = option("", "output directory ('' = ARTIFACT_DIR/export); an earlier export there is replaced")
    data: str = option(
        "", "prepared dataset for the parity check and int8 calibration ('' = the one the artifact records)"
    )
    split: str = option("val", "split the parity check runs on")
    batch_size: int = option(256, "images per forward pass in the parity check and per calibration batch")
    calib_batches: int = option(8, "batches of the training split that calibrate int8 activations")
    min_agreement: float = option(0.999, "top-1 agreement with the source an fp32 file must reach")
    min_int8_agreement: float = option(0.995, "top-1 agreement with the source an int8 file must reach")
    int8_reduce_range: str = option(
        "auto",
        "int8 range for CPUs without VNNI, whose kernels would overflow at full range: "
        "on = a student's 8-bit-weight layers stay float and a float model's activations get 7 bits (torch), 7-bit "
        "weights (ONNX); off = full 8 bits everywhere; "
        "auto = on unless this CPU has VNNI",
        choices=("auto", "on", "off"),
    )

    def validate(self) -> None:
        require(bool(self.artifact), "--artifact PATH is required (a compressed artifact or checkpoint)")
        require(self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        require(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.calib_batches > 0, f"--calib-batches must be a positive integer, got {self.calib_batches}")
        for flag, v in (("--min-agreement", self.min_agreement), ("--min-int8-agreement", self.min_int8_agreement)):
            require(0.0 <= v <= 1.0, f"{flag} must be in [0, 1], got {v}")
        require(
            self.int8_reduce_range in ("auto", "on", "off"),
            f"--int8-reduce-range must be auto, on or off, got {self.int8_reduce_range!r}",
        )

    @property
    def reduce_range(self) -> bool:

        return self.int8_reduce_range == "on" or (self.int8_reduce_range == "auto" and not vnni())

    @property
    def kinds(self) -> list[str]:
        """The files to write, in order (the fp32 ONNX file is the int8 one's input)."""
        base = FORMATS[self.format]
        return [k for b in base for k in ((b, f"{b}-int8") if self.int8 else (b,))]


# ------------------------------------------------------------------ inputs


def recorded_data(payload: dict[str, Any], path: Path) -> Path | None:
    """The prepared dataset a checkpoint or artifact came from, if it is still here: the
    training run's ``--data`` (a checkpoint's config), the compress run's (``metrics.json``
    beside the artifact), or its teacher's. Preferring one whose checksum matches."""

    def data_dir(config: dict[str, Any] | None) -> str:
        data = (config or {}).get("data")
        return str(data.get("data") or "") if isinstance(data, dict) else ""

    found = [data_dir(payload.get("config"))]
    metrics = (path if path.is_dir() else path.parent) / "metrics.json"
    if metrics.is_file():
        with contextlib.suppress(OSError, ValueError):
            found.append(data_dir(json.loads(metrics.read_text()).get("config")))
    teacher = str((payload.get("teacher") or {}).get("path") or "")
    if teacher and Path(teacher).exists():
        with contextlib.suppress(EffrayError):
            found.append(data_dir(read_payload(teacher).get("config")))
    here = [Path(d) for d in found if d and (Path(d) / "meta.json").is_file()]
    checksum = (payload.get("data") or {}).get("checksum")
    for d in here:
        with contextlib.suppress(OSError, ValueError):
            if checksum and json.loads((d / "meta.json").read_text()).get("source_checksum") == checksum:
                return d
    return here[0] if here else None


def check_dataset(meta: dict[str, Any], info: Any, data: Path) -> None:
    """The dataset must be the model's kind: same classes, same image shape."""
    classes = [str(c) for c in meta.get("classes", [])]
    require(
        int(meta["num_classes"]) == info.num_classes and (not classes or classes == info.classes),
        f"dataset {data} has {meta['num_classes']} classes, the model predicts {info.num_classes} "
        f"({', '.join(info.classes[:4])}...): pass the dataset it was trained on",
    )
    require(
        list(meta["image_shape"]) == list(info.image_shape),
        f"dataset {data} has {list(meta['image_shape'])} (HWC) images, the model takes {list(info.image_shape)}: "
        "pass the dataset it was trained on",
    )


def split_batches(data: Path, split: str, batch_size: int, limit: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """uint8 NHWC image and label batches of a split, in file order (the first ``limit``
    batches when > 0)."""

    out = []
    for x, y in prepared_batches(data, split, batch_size)[1]:
        if limit and len(out) >= limit:
            break
        out.append((x, y.astype(np.int64)))
    require(bool(out), f"split {split!r} of {data} is empty: pass a --split with images in it")
    return out


# ------------------------------------------------------------------ writers


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


# ops between a layer and the next one's input that commute with rounding on one grid
# (a grid that holds 0 for ReLU): the next layer's input grid can round there instead
_COMMUTING = ("Relu", "MaxPool", "Reshape", "Flatten")


def _identity_pool(node: Any) -> bool:
    """An ``AveragePool`` over 1x1 windows (``AdaptiveAvgPool2d`` to the size it is given)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return node.op_type == "AveragePool" and all(k == 1 for k in attrs.get("kernel_shape", [0]))


def onnx_overrides(
    onnx_path: Path, steps: dict[str, Any], grids: dict[str, tuple[float, int, int]]
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """ONNX Runtime ``TensorQuantOverrides`` that make its int8 model round where the student
    rounds, on the student's grids; returns them and how many layers' weights they pin.

    * Weights: each student layer's per-channel step is the int8 scale, so the codes are
      its k-bit codes. Codes beyond 7 bits (the 8-bit first and last layers) are stored
      uint8 with zero point 128: ONNX Runtime's x86 kernels without VNNI sum uint8 x int8
      pairs in int16, which overflows at full range (64 % agreement measured), while its
      uint8 x uint8 kernels widen first. Codes within 7 bits stay int8 (fast everywhere).
    * Activations: a layer's input tensor takes the student's activation scale and zero
      point (``grids``), and so do the tensors upstream of it through ReLU, max-pool and
      reshapes back to the previous layer's output, which ORT must quantize to fuse its
      int8 kernel: rounding there, on the same grid, equals rounding at the input. A grid
      of ``2^k`` levels (k < 8) is placed at the top of the uint8 range (zero point
      ``255 - (2^k - 1 - zero)``) so uint8 saturation is the student's clamp; that is exact
      for the non-negative inputs that follow a ReLU."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(onnx_path)).graph
    weights = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    out: dict[str, list[dict[str, Any]]] = {}
    pinned = 0
    for node in graph.node:
        name = node.input[1] if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else ""
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
        if name not in steps or name not in weights:
            continue
        w, step = numpy_helper.to_array(weights[name]), np.asarray(steps[name], np.float32)
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if node.op_type == "Conv" or trans_b else w.ndim - 1
        if w.shape[axis] != len(step):
            continue
        codes = w / step.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        if np.abs(codes).max() > 127 or not np.array_equal(codes, np.round(codes)):
            continue
        wide = np.abs(codes).max() > 63
        out[name] = [
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
) -> int:
    """Static QDQ after ORT's pre-processing: per-channel symmetric weights, uint8
    activations; a student's layers on its own grids (:func:`onnx_overrides`), anything
    else calibrated by min/max on ``calib`` (``reduce_range``: 7-bit weights, for CPUs
    without VNNI). Linear layers keep float outputs (ORT's ``QGemm`` takes that), so the
    logits are not rounded to 8 bits. Returns how many student layers keep their grid."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {INPUT: x}

    pre = path.with_name(path.stem + ".pre.onnx")
    try:
        with _silent():
            quant_pre_process(str(fp32), str(pre))
            overrides, pinned = onnx_overrides(pre, steps, grids)
            quantize_static(
                str(pre),
                str(path),
                Calibration(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={
                    "TensorQuantOverrides": overrides,
                    "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                },
            )
    finally:
        pre.unlink(missing_ok=True)
    return pinned


# ------------------------------------------------------------------ parity


def parity(
    deployable: Any, images: np.ndarray, labels: np.ndarray, reference: np.ndarray, batch_size: int
) -> dict[str, Any]:
    """Top-1 agreement and max |logit difference| of ``deployable`` against ``reference``
    logits on ``images``, and both accuracies."""
    logits = np.concatenate([deployable.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    pred, ref = logits.argmax(1), reference.argmax(1)
    return {
        "agreement": float((pred == ref).mean()),
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "accuracy": float((pred == labels).mean()),
        "source_accuracy": float((ref == labels).mean()),
        "images": int(len(images)),
    }


def _reference(model: Any, info: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(
                model(torch.from_numpy(normalise(images[i : i + batch_size], info.mean, info.std))).float().numpy()
            )
    return np.concatenate(out)


# ------------------------------------------------------------------ the command


def _why(model: Any, kind: str) -> str:
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


def _out_dir(cfg: ExportConfig, artifact: Path) -> Path:

    out = Path(cfg.out).expanduser() if cfg.out else (artifact if artifact.is_dir() else artifact.parent) / "export"
    out = out.resolve()
    require(
        not out.exists() or (out.is_dir() and ((out / SIDECAR).is_file() or not any(out.iterdir()))),
        f"--out {out} exists and is not an `effray export` output; pass another --out",
    )
    return out


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the requested files to ``--out``, each checked against the source; returns the
    summary the CLI prints (files, parity figures, seconds)."""
    import torch

    artifact = Path(cfg.artifact).expanduser()
    model, payload, info = open_checkpoint(artifact)
    data = Path(cfg.data).expanduser() if cfg.data else recorded_data(payload, artifact)
    require(data is not None, f"{artifact} records no dataset that exists here: pass --data DIR (a prepared dataset)")
    check_dataset(load_meta(data), info, data)
    out = _out_dir(cfg, artifact)
    held_out = split_batches(data, cfg.split, cfg.batch_size)
    images, labels = np.concatenate([x for x, _ in held_out]), np.concatenate([y for _, y in held_out])
    calib = (
        [normalise(x, info.mean, info.std) for x, _ in split_batches(data, "train", cfg.batch_size, cfg.calib_batches)]
        if cfg.int8
        else []
    )
    example = torch.from_numpy(
        normalise(images[:2] if len(images) >= 2 else np.repeat(images, 2, 0), info.mean, info.std)
    )
    # before anything is written: a model torch can't capture fails here. The fp32 files
    # compute what the artifact computes, activation quantizers included (exact parity);
    # the int8 files start from the plain float twin and calibrate activations themselves
    program = export_program(float_twin(model, keep_activations=True), example)
    # ONNX Runtime's int8 model starts from the plain float twin: its QDQ nodes take the
    # activation quantizers' place, on the student's grids (onnx_overrides)
    plain = export_program(float_twin(model), example) if cfg.int8 and "onnx-int8" in cfg.kinds else None
    reference = _reference(model, info, images, cfg.batch_size)

    exported = dataclasses.replace(
        info,
        kind="export",
        numerics={"bf16": False, "channels_last": False},
        provenance={**info.provenance, "torch": torch.__version__},
    )
    tmp = temp_sibling(out, "export")
    files: dict[str, str] = {}
    figures: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    steps = {k: v.tolist() for k, v in weight_steps(model).items()}
    grids = activation_grids(model)
    pinned: dict[str, int] = {}  # int8 files: student layers whose k-bit grid the int8 weights keep
    # read back by load_deployable: a full-range int8 program runs its int8 kernels only on a VNNI CPU
    int8_info = (
        {"reduce_range": cfg.reduce_range, "student_grid_layers": pinned, "student_layers": len(steps)}
        if cfg.int8
        else {}
    )
    try:
        tmp.mkdir(parents=True)
        for kind in cfg.kinds:
            path = tmp / EXPORT_FILES[kind]
            t = time.perf_counter()
            if kind == "torch":
                write_torch(path, program)
            elif kind == "torch-int8":
                int8 = quantize_int8(
                    model,
                    [(torch.from_numpy(x), None) for x in calib],
                    max_batches=cfg.calib_batches,
                    reduce_range=cfg.reduce_range,
                )
                pinned["torch-int8"] = int(int8.meta.get("student_grid_layers", 0))
                write_torch(path, export_program(int8, example))
            elif kind == "onnx":
                write_onnx(path, program, example)
            else:
                base = tmp / ".float-twin.onnx"
                try:
                    write_onnx(base, plain, example)
                    pinned["onnx-int8"] = write_onnx_int8(path, base, calib, steps, grids, cfg.reduce_range)
                finally:
                    base.unlink(missing_ok=True)
            seconds[f"{kind}_write_s"] = time.perf_counter() - t
            files[kind] = path.name
            write_sidecar(
                tmp, exported, files=files, parity=figures, int8=int8_info
            )  # load_deployable finds the file through it
            t = time.perf_counter()
            loaded = load_deployable(tmp, device="cpu", kind=kind)
            seconds[f"{kind}_load_s"] = time.perf_counter() - t
            figures[kind] = parity(loaded, images, labels, reference, cfg.batch_size)
            need = cfg.min_int8_agreement if kind.endswith("int8") else cfg.min_agreement
            figures[kind]["min_agreement"] = need
            if figures[kind]["agreement"] < need:
                path.unlink(missing_ok=True)
                f = figures[kind]
                raise EffrayError(
                    f"{path.name} failed the parity check: top-1 agreement {f['agreement']:.4f} < {need} with "
                    f"the source on {f['images']} {cfg.split} images (max |logit diff| {f['max_abs_logit_diff']:.3g})"
                    f"{_why(model, kind)}; nothing written"
                )
        write_sidecar(
            tmp,
            exported,
            files=files,
            parity=figures,
            data={"path": str(data.resolve()), "split": cfg.split},
            exported_from=str(artifact.resolve()),
            int8=int8_info,
        )
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out),
        "files": {k: str(out / v) for k, v in files.items()},
        "parity": figures,
        "data": str(data.resolve()),
        "split": cfg.split,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "int8": int8_info,
    }
