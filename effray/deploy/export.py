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
:func:`effray.deploy.writers.onnx_overrides`). A CPU without VNNI sums uint8 x int8 pairs in int16, which
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
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effray.atomic import replace_dir, temp_sibling
from effray.compress.int8 import activation_grids, weight_steps
from effray.compress.program import export_program, float_twin
from effray.config import require
from effray.console import say
from effray.data.arrays import prepared_batches
from effray.data.augment import preprocess
from effray.data.prepare import load_meta
from effray.deploy.config import ExportConfig
from effray.deploy.model import (
    EXPORT_FILES,
    SIDECAR,
    Deployable,
    ModelInfo,
    load_deployable,
    normalise,
    open_checkpoint,
    write_sidecar,
)
from effray.deploy.writers import ExportSources, why_int8_disagrees, write_export
from effray.errors import EffrayError
from effray.metrics import class_sums, score_batches, sums_metrics
from effray.models.predict import predict_logits
from effray.train.checkpoint import read_payload

Batches = list[tuple[np.ndarray, np.ndarray]]


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
    """The dataset must be the model's kind: same classes, same channels (images of another
    size go through the model's preprocessing, :func:`split_batches`)."""
    classes = [str(c) for c in meta.get("classes", [])]
    require(
        int(meta["num_classes"]) == info.num_classes and (not classes or classes == info.classes),
        f"dataset {data} has {meta['num_classes']} classes, the model predicts {info.num_classes} "
        f"({', '.join(info.classes[:4])}...): pass the dataset it was trained on",
    )
    require(
        int(meta["image_shape"][2]) == int(info.image_shape[2]),
        f"dataset {data} has {list(meta['image_shape'])} (HWC) images, the model takes {list(info.image_shape)}: "
        "pass the dataset it was trained on",
    )


def split_batches(data: Path, split: str, batch_size: int, limit: int = 0, resize: str = "") -> Batches:
    """uint8 NHWC image and label batches of a split, in file order (the first ``limit``
    batches when > 0), brought to the model's size by ``resize`` (its preprocessing) when
    they are stored at another."""

    out = []
    for x, y in prepared_batches(data, split, batch_size)[1]:
        if limit and len(out) >= limit:
            break
        out.append((preprocess(torch.from_numpy(x), resize).numpy(), y.astype(np.int64)))
    require(bool(out), f"split {split!r} of {data} is empty: pass a --split with images in it")
    return out


# ------------------------------------------------------------------ parity


def source_scores(model: Any, info: ModelInfo, held_out: Batches) -> dict[str, Any]:
    """The source's accuracy and logits on ``held_out``, run as :func:`load_deployable` runs
    an artifact: fp32, its own (fake-quant) layers, no test-time augmentation."""
    return score_batches(
        lambda x: predict_logits(model, x, info.mean, info.std), held_out, info.num_classes, keep_logits=True
    )


def parity(deployable: Deployable, held_out: Batches, source: dict[str, Any]) -> dict[str, Any]:
    """Top-1 agreement and max |logit difference| of ``deployable`` against the source's
    logits (:func:`source_scores`) on ``held_out``, and both accuracies: agreement is the
    accuracy of the file's logits on the source's top-1 labels."""
    classes = deployable.info.num_classes
    scored = score_batches(lambda x: torch.from_numpy(deployable.logits(x)), held_out, classes, keep_logits=True)
    logits, reference = scored["logits"], source["logits"]
    return {
        "agreement": sums_metrics(class_sums(logits, reference.argmax(1), classes), classes)["accuracy"],
        "max_abs_logit_diff": float((logits - reference).abs().max()),
        "accuracy": scored["accuracy"],
        "source_accuracy": source["accuracy"],
        "images": scored["count"],
    }


# ------------------------------------------------------------------ the command


def _out_dir(cfg: ExportConfig, artifact: Path) -> Path:
    out = Path(cfg.out).expanduser() if cfg.out else (artifact if artifact.is_dir() else artifact.parent) / "export"
    out = out.resolve()
    require(
        not out.exists() or (out.is_dir() and ((out / SIDECAR).is_file() or not any(out.iterdir()))),
        f"--out {out} exists and is not an `effray export` output; pass another --out",
    )
    return out


def _sources(cfg: ExportConfig, model: Any, info: ModelInfo, data: Path, held_out: Batches) -> ExportSources:
    """Everything the files are written from. Before anything is written: a model torch
    can't capture fails here."""
    calib = (
        [
            normalise(x, info.mean, info.std)
            for x, _ in split_batches(data, "train", cfg.batch_size, cfg.calib_batches, info.resize)
        ]
        if cfg.int8
        else []
    )
    first = np.concatenate([x for x, _ in held_out[:2]])[:2]
    example = torch.from_numpy(normalise(first if len(first) >= 2 else np.repeat(first, 2, 0), info.mean, info.std))
    return ExportSources(
        model=model,
        program=export_program(float_twin(model, keep_activations=True), example),
        plain=export_program(float_twin(model), example) if cfg.int8 and "onnx-int8" in cfg.kinds else None,
        example=example,
        calib=calib,
        steps={k: v.tolist() for k, v in weight_steps(model).items()},
        grids=activation_grids(model),
    )


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the requested files to ``--out``, each checked against the source; returns the
    summary the CLI prints (files, parity figures, seconds)."""
    artifact = Path(cfg.artifact).expanduser()
    model, payload, info = open_checkpoint(artifact, cfg.trust_code)
    data = Path(cfg.data).expanduser() if cfg.data else recorded_data(payload, artifact)
    require(data is not None, f"{artifact} records no dataset that exists here: pass --data DIR (a prepared dataset)")
    check_dataset(load_meta(data), info, data)
    out = _out_dir(cfg, artifact)
    held_out = split_batches(data, cfg.split, cfg.batch_size, resize=info.resize)
    src = _sources(cfg, model, info, data, held_out)
    source = source_scores(model, info, held_out)

    exported = dataclasses.replace(
        info,
        kind="export",
        numerics={"bf16": False, "channels_last": False},
        provenance={**info.provenance, "torch": torch.__version__},
    )
    files: dict[str, str] = {}
    figures: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    pinned: dict[str, int] = {}  # int8 files: student layers whose k-bit grid the int8 weights keep
    # read back by load_deployable: a full-range int8 program runs its int8 kernels only on a VNNI CPU
    int8_info = (
        {"reduce_range": cfg.reduce_range, "student_grid_layers": pinned, "student_layers": len(src.steps)}
        if cfg.int8
        else {}
    )
    tmp = temp_sibling(out, "export")
    try:
        tmp.mkdir(parents=True)
        for kind in cfg.kinds:
            path = tmp / EXPORT_FILES[kind]
            failed = int8_info.get("failed", {})
            if kind == "openvino-int8" and "onnx-int8" in failed:  # converted from a file that was left out
                failed[kind] = f"converted from {EXPORT_FILES['onnx-int8']}, which was left out"
                continue
            t = time.perf_counter()
            try:
                kept = write_export(kind, path, src, cfg.reduce_range, cfg.calib_batches)
            except EffrayError as exc:
                if kind == "torch-int8":
                    # PT2E can't lower every graph (a torchvision ResNet's residual adds): the ONNX and
                    # OpenVINO int8 files don't depend on it, so they are still written, and the reason is kept
                    int8_info.setdefault("skipped", {})[kind] = str(exc)
                    say(f"[effray export] {kind} skipped: {exc}")
                    continue
                if not (cfg.int8_fallback and kind.endswith("int8")):
                    raise
                int8_info.setdefault("failed", {})[kind] = str(exc)
                say(f"[effray export] {kind} left out: {exc}")
                continue
            if kept is not None:
                pinned[kind] = kept
            seconds[f"{kind}_write_s"] = time.perf_counter() - t
            files[kind] = path.name
            write_sidecar(tmp, exported, files=files, parity=figures, int8=int8_info)  # load_deployable reads it
            t = time.perf_counter()
            loaded = load_deployable(tmp, device="cpu", kind=kind)
            seconds[f"{kind}_load_s"] = time.perf_counter() - t
            need = cfg.min_int8_agreement if kind.endswith("int8") else cfg.min_agreement
            f = figures[kind] = {**parity(loaded, held_out, source), "min_agreement": need}
            if f["agreement"] < need:
                path.unlink(missing_ok=True)
                failure = (
                    f"{path.name} failed the parity check: top-1 agreement {f['agreement']:.4f} < {need} with "
                    f"the source on {f['images']} {cfg.split} images (max |logit diff| {f['max_abs_logit_diff']:.3g})"
                    f"{why_int8_disagrees(model, kind)}"
                )
                if not (cfg.int8_fallback and kind.endswith("int8")):
                    raise EffrayError(f"{failure}; nothing written")
                # --int8-fallback: the fp32 files (and any int8 file that passed) are kept, and why this one is not
                del files[kind], figures[kind]
                pinned.pop(kind, None)
                int8_info.setdefault("failed", {})[kind] = failure
                say(f"[effray export] {kind} left out: {failure}")
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
