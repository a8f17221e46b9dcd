"""One loader for everything deployment runs: a training checkpoint, a compressed artifact,
or an exported program (``effray export``: ``.pt2``, ONNX fp32, ONNX int8 QDQ, OpenVINO).

Whatever the file, :func:`load_deployable` returns a :class:`Deployable` that maps uint8
NHWC images to float32 logits with the normalisation and numerics the model was trained
with, and a :class:`ModelInfo` with the classes, image shape and provenance a server or a
batch job reports. Exported models carry that information in a ``deploy.json`` sidecar
(:func:`write_sidecar`), since a ``.pt2`` or ``.onnx`` file holds only the graph.

Its probabilities are ``softmax(logits / T)`` with the temperature T an artifact records
(post-hoc temperature scaling, fitted when it was measured; 1 for a file without one):
the confidence it reports is the calibrated one, its logits and top-1 unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effray.atomic import write_json
from effray.compress.artifact import FORMAT as ARTIFACT_FORMAT
from effray.compress.artifact import temperature_of
from effray.compress.int8 import lower_x86
from effray.compress.program import quiet, vnni
from effray.config import require
from effray.data.augment import default_preprocess
from effray.data.images import normalize_tensor
from effray.deploy.runtimes import openvino_model, ort_session
from effray.errors import EffrayError
from effray.models.predict import predict_logits
from effray.train.checkpoint import TRAIN_FORMAT, load_checkpoint

SIDECAR = "deploy.json"
EXPORT_FILES = {
    "torch": "model.pt2",
    "onnx": "model.onnx",
    "onnx-int8": "model.int8.onnx",
    "torch-int8": "model.int8.pt2",
    "openvino": "model.xml",  # + model.bin beside it
    "openvino-int8": "model.int8.xml",
}


@dataclass(frozen=True)
class ModelInfo:
    """What a deployed model needs besides its weights, and what it reports."""

    classes: list[str]
    image_shape: list[int]  # HWC
    mean: list[float]
    std: list[float]
    kind: str  # checkpoint | artifact | an export kind (EXPORT_FILES)
    source: str  # the file this was loaded from
    numerics: dict[str, bool] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    preprocess: str = ""  # what turns an image of any size into image_shape ("": recorded before it was)
    temperature: float = 1.0  # probabilities are softmax(logits / temperature)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def resize(self) -> str:
        """The preprocessing that brings an image of another size to ``image_shape``: the
        recorded one, else the short side resized and the centre cropped to it."""
        return self.preprocess or default_preprocess(self.image_shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Deployable:
    """uint8 NHWC images -> float32 logits (numpy), on ``device``. Call :meth:`logits`
    from one thread at a time (ONNX Runtime sessions are thread-safe; torch modules in
    eval mode under no_grad are too, but one caller keeps the threads predictable)."""

    def __init__(self, info: ModelInfo, forward: Any, device: str = "cpu") -> None:
        self.info, self._forward, self.device = info, forward, device

    def logits(self, images: np.ndarray) -> np.ndarray:
        h, w, c = self.info.image_shape
        require(
            images.ndim == 4 and tuple(images.shape[1:]) == (h, w, c),
            f"images are {list(images.shape[1:])} (HWC), the model takes {[h, w, c]}",
        )
        if len(images) == 0:
            return np.zeros((0, self.info.num_classes), np.float32)
        return self._forward(np.require(images, np.uint8, requirements=["C", "W"]))  # torch takes no read-only array

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.calibrated(self.logits(images)).astype(np.float32)

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities (float64) of logits this model produced: ``softmax(logits / T)``."""
        return softmax(np.asarray(logits, np.float64) / self.info.temperature)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the max subtracted first): the one the batch job, the
    server and :meth:`Deployable.probabilities` report, each storing it at its own width."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def normalise(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW as numpy, for ONNX Runtime and the exporters:
    :func:`effray.data.images.normalize_tensor`, the pipeline's own arithmetic."""
    import torch

    images = np.require(images, np.uint8, requirements=["C", "W"])  # Ray's arrays are read-only
    return normalize_tensor(torch.from_numpy(images), mean, std).numpy()


def resolve_device(device: str = "auto") -> str:
    """``auto``: the first GPU when torch sees one (a Ray actor given ``num_gpus=1`` sees
    exactly its own), else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def write_sidecar(out_dir: str | os.PathLike, info: ModelInfo, **extra: Any) -> Path:
    """``deploy.json`` next to an exported model: its :class:`ModelInfo` plus ``extra``
    (the exported files, parity figures), written atomically."""
    return write_json(Path(out_dir) / SIDECAR, {**info.to_dict(), **extra})


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    sidecar = p / SIDECAR if p.is_dir() else p.parent / SIDECAR
    require(sidecar.is_file(), f"{p} has no {SIDECAR}: export it with `effray export` (or pass a checkpoint/artifact)")
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise EffrayError(f"{sidecar} is unreadable ({type(exc).__name__}); re-run `effray export`") from None


def info_from_payload(payload: dict[str, Any], source: str) -> ModelInfo:
    """A checkpoint's or artifact's :class:`ModelInfo` (its recorded data summary)."""
    spec, data = payload.get("model_spec") or {}, payload.get("data") or {}
    require(
        "mean" in data and "image_shape" in data,
        f"{source} (format {payload.get('format')}) records no data normalisation; it can't be deployed",
    )
    num_classes = int(spec.get("num_classes", data.get("num_classes", 0)))
    classes = [str(c) for c in (data.get("classes") or range(num_classes))]
    kind = "artifact" if payload.get("format") == "effray.compressed" else "checkpoint"
    provenance = {
        **(payload.get("provenance") or {}),
        "format": payload.get("format"),
        "model": spec.get("name"),
        "method": payload.get("method") or {},
        "data_checksum": data.get("checksum", ""),
    }
    return ModelInfo(
        classes=classes,
        image_shape=[int(v) for v in data["image_shape"]],
        mean=list(data["mean"]),
        std=list(data["std"]),
        kind=kind,
        source=os.path.abspath(source),
        numerics=dict(payload.get("numerics") or {}),
        provenance=provenance,
        preprocess=str(data.get("preprocess") or ""),
        temperature=temperature_of(payload),
    )


def _is_export(path: Path) -> bool:
    return path.suffix in (".pt2", ".onnx", ".xml") or (path.is_dir() and (path / SIDECAR).is_file())


def load_deployable(
    path: str | os.PathLike, device: str = "auto", kind: str = "", trust_code: bool = False
) -> Deployable:
    """Open ``path``: a checkpoint or artifact (directory or ``model.pt``), or an export
    directory / file. ``kind`` picks one file of an export directory holding several
    (``torch``, ``onnx``, ``onnx-int8``, ``torch-int8``, ``openvino``, ``openvino-int8``;
    default: the first present in that order). Bad paths fail in one line. ``trust_code``: a
    checkpoint's ``pkg.module:factory`` may be imported (an export needs no model code)."""
    p = Path(path)
    require(
        p.exists(), f"model path {str(path)!r} does not exist: pass a checkpoint, artifact or `effray export` output"
    )
    device = resolve_device(device)
    if _is_export(p):
        return _load_export(p, device, kind)
    return _load_checkpoint(p, device, trust_code)


def open_checkpoint(path: str | os.PathLike, trust_code: bool = False) -> tuple[Any, dict[str, Any], ModelInfo]:
    """``(model in eval mode on the CPU, payload, info)`` of a training checkpoint or a
    compressed artifact; anything else (an export, a generator, a stray file) fails in one line."""

    p = Path(path)
    require(
        p.exists(), f"model path {str(path)!r} does not exist: pass a checkpoint, artifact or `effray export` output"
    )
    require(
        not _is_export(p),
        f"{p} is an `effray export` output, not a checkpoint or artifact; pass the artifact it came from",
    )
    try:
        model, payload = load_checkpoint(p, trust_code)
    except EffrayError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise EffrayError(
            f"{p} is not an effray checkpoint or artifact ({type(exc).__name__}); "
            "pass a `effray train` checkpoint, a compressed artifact or an `effray export` output"
        ) from None
    require(
        payload.get("format") in (TRAIN_FORMAT, ARTIFACT_FORMAT),  # classifiers, not a GAN's generator
        f"{p} is a {payload.get('format')!r} checkpoint, not a classifier; pass a `effray train` checkpoint or a "
        "compressed artifact",
    )
    return model, payload, info_from_payload(payload, str(p))


def device_logits(model: Any, images: Any, info: ModelInfo, tta: int = 0) -> Any:
    """Float32 logits of uint8 NHWC ``images`` that are already on the model's device,
    left there: normalised on the device, in the numerics (bf16, channels-last) the model
    was trained with, averaged over ``tta`` test-time views. No host sync."""
    import torch

    with torch.no_grad():
        return predict_logits(model, images, info.mean, info.std, tta, info.numerics)


def _load_checkpoint(p: Path, device: str, trust_code: bool = False) -> Deployable:
    import torch

    model, payload, info = open_checkpoint(p, trust_code)
    model = model.to(device).eval()
    tta = int((payload.get("config") or {}).get("tta", 0)) if info.kind == "checkpoint" else 0

    def forward(images: np.ndarray) -> np.ndarray:  # uint8 to the device: a quarter of float32's bytes
        return device_logits(model, torch.from_numpy(images).to(device), info, tta).cpu().numpy()

    return Deployable(info, forward, device)


def _export_file(p: Path, sidecar: dict[str, Any], kind: str) -> tuple[str, Path]:
    if p.is_file():
        found = [k for k, name in EXPORT_FILES.items() if name == p.name]
        require(bool(found), f"{p} is not one of effray's export files ({', '.join(EXPORT_FILES.values())})")
        return found[0], p
    files = sidecar.get("files") or {}
    order = [kind] if kind else list(EXPORT_FILES)
    for k in order:
        if k in files and (p / files[k]).is_file():
            return k, p / files[k]
    raise EffrayError(
        f"{p} holds no {kind or 'exported'} model (has: {', '.join(sorted(files)) or 'nothing'}); "
        "run `effray export` with that --format"
    )


def _load_export(p: Path, device: str, kind: str) -> Deployable:
    sidecar = read_sidecar(p)
    kind, f = _export_file(p, sidecar, kind)
    info = ModelInfo(
        classes=list(sidecar["classes"]),
        image_shape=list(sidecar["image_shape"]),
        mean=list(sidecar["mean"]),
        std=list(sidecar["std"]),
        kind=kind,
        source=str(f.resolve()),
        numerics=dict(sidecar.get("numerics") or {}),
        provenance=dict(sidecar.get("provenance") or {}),
        preprocess=str(sidecar.get("preprocess") or ""),
        temperature=temperature_of(sidecar),
    )
    if kind.startswith("onnx"):
        return Deployable(info, _onnx_forward(f, info, device), device)
    if kind.startswith("openvino"):
        return Deployable(info, _openvino_forward(f, info), "cpu")
    full_range = not (sidecar.get("int8") or {}).get("reduce_range", True)
    return Deployable(info, _program_forward(f, info, device, kind, full_range), device)


def _onnx_forward(f: Path, info: ModelInfo, device: str) -> Any:
    session = ort_session(f, cuda=device.startswith("cuda"))
    name = session.get_inputs()[0].name

    def forward(images: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: normalise(images, info.mean, info.std)})[0], np.float32)

    return forward


def _openvino_forward(f: Path, info: ModelInfo) -> Any:
    request = openvino_model(f).create_infer_request()  # one caller at a time (see Deployable)

    def forward(images: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: normalise(images, info.mean, info.std)})[0], np.float32)

    return forward


def load_program(
    f: str | os.PathLike,
    kind: str = "torch",
    device: str = "cpu",
    image_shape: list[int] | None = None,
    full_range: bool = False,
) -> Any:
    """The torch module of a ``.pt2`` export, on ``device``. The int8 one is a PT2E q/dq
    program (portable: float arithmetic on int8 values anywhere); on an x86 CPU it is
    lowered here to oneDNN's int8 kernels (:func:`effray.compress.int8.lower_x86`: seconds,
    once per load), which needs an ``image_shape`` (HWC) to trace with. ``full_range``: the
    program was written on a VNNI CPU with 8-bit activations into 8-bit weights, which a CPU
    without VNNI would overflow in its int16 pair sums; there it runs unlowered (exact, slower)."""
    import torch

    if kind == "torch-int8":
        with quiet():
            import torchao.quantization.pt2e  # noqa: F401  (registers the q/dq ops the program calls)
    try:
        module = torch.export.load(str(f)).module()
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
        raise EffrayError(
            f"{f} is not a loadable torch.export program ({type(exc).__name__}); re-run `effray export`"
        ) from None
    if kind == "torch-int8" and device == "cpu" and torch.backends.mkldnn.is_available():
        if full_range and not vnni():
            return module.to(device)

        require(image_shape is not None, "lowering an int8 program needs the image shape")
        h, w, c = image_shape
        module = lower_x86(module, torch.zeros(2, c, h, w))
    return module.to(device)


def _program_forward(f: Path, info: ModelInfo, device: str, kind: str = "torch", full_range: bool = False) -> Any:
    import torch

    module = load_program(f, kind, device, info.image_shape, full_range)

    def forward(images: np.ndarray) -> np.ndarray:  # fp32 and no TTA: what the program was exported as
        with torch.no_grad():
            return predict_logits(module, torch.from_numpy(images).to(device), info.mean, info.std).cpu().numpy()

    return forward
