"""``effray sensitivity``: the per-layer probes of :mod:`effray.compress.sensitivity` as Ray
tasks across the cluster, one task per layer (all of that layer's settings).

The driver checks every input before anything is written, puts the teacher and the
calibration arrays in the object store once, and writes each finished layer's rows to
``OUT/parts/`` atomically as its task returns. A part is named by a hash of everything its
rows depend on (the teacher file, the calibration pixels and labels, the normalisation, the
settings, the layer), so a rerun, or a run after an interruption, submits only the layers
that have no part yet. The assembled ``sensitivity.parquet``, the heat map and the summary
are rewritten from the parts on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effray.atomic import write_file, write_json
from effray.compress.artifact import file_checksum
from effray.compress.quantize import is_quantized
from effray.compress.sensitivity import SensitivityConfig, Setting, layer_names, probe_layer, score, with_drops
from effray.config import require, to_dict, validated
from effray.console import bar, say
from effray.data.arrays import Arrays, eval_batches, load_arrays
from effray.data.pipeline import validate_data_dir
from effray.metrics import save_figure
from effray.train.checkpoint import load_checkpoint
from effray.train.run import provenance

PARTS = "parts"
PARQUET, HEATMAP, SUMMARY = "sensitivity.parquet", "sensitivity.png", "sensitivity.json"
PROBE_VERSION = 2  # bump when a probe (or its columns) changes: every part keyed by the old one is redone
COLUMNS = {
    "layer": "string",
    "kind": "string",
    "value": "float64",
    "accuracy": "float64",
    "loss": "float64",
    "accuracy_drop": "float64",
    "loss_increase": "float64",
    "params": "int64",
    "model_params": "int64",
    "model_macs": "int64",
    "cut_layers": "string",
    "skipped_reason": "string",
}


def model_meta(meta: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The dataset's meta as the teacher sees its images: the normalisation and the
    preprocessing the checkpoint records (as `effray evaluate` applies them), the dataset's
    own where the checkpoint says nothing."""
    data = payload.get("data") or {}
    return {
        **meta,
        "mean": data.get("mean", meta["mean"]),
        "std": data.get("std", meta["std"]),
        "preprocess": data.get("preprocess"),
    }


def check_inputs(cfg: SensitivityConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Every check that can fail on user input, writing nothing: ``(teacher, meta)``."""
    validated(cfg)
    out = Path(cfg.out)
    require(not out.exists() or out.is_dir(), f"--out {cfg.out} is a file, not a directory")
    meta = validate_data_dir(cfg.data)
    require(
        "val" in meta["splits"] and meta["counts"].get("val", 0) > 0,
        f"dataset {cfg.data} has no val split to calibrate on; re-prepare it with --val-fraction > 0",
    )
    require(
        not cfg.bn_recalib or meta["counts"].get("train", 0) > 0,
        f"--bn-recalib needs a train split, and dataset {cfg.data} has none",
    )
    teacher, payload = load_checkpoint(cfg.teacher, cfg.trust_code)
    require(
        not is_quantized(teacher),
        f"{cfg.teacher} is already quantized; probe the float teacher it came from (a checkpoint of effray train)",
    )
    spec = dict(getattr(teacher, "spec", {}) or payload.get("model_spec", {}))
    require(
        int(spec.get("num_classes", -1)) == int(meta["num_classes"]),
        f"teacher {cfg.teacher} predicts {spec.get('num_classes')} classes, {cfg.data} has "
        f"{meta['num_classes']}; use the dataset it was trained on",
    )
    require(bool(layer_names(teacher)), f"{cfg.teacher} has no conv or linear layer to probe")
    return teacher, model_meta(meta, payload)


def _digest(arrays: Arrays | None) -> str:
    if arrays is None:
        return ""
    h = hashlib.sha256()
    for key in ("image", "label"):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def probe_task(
    teacher: torch.nn.Module,
    calib: Arrays,
    train: Arrays | None,
    meta: dict[str, Any],
    layer: str | None,
    settings: list[Setting],
    batch_size: int,
    threads: int,
    use_gpu: bool,
) -> dict[str, Any]:
    """One Ray task: the teacher's own score (``layer`` None) or one layer's probe rows. The
    batches are normalised once here and stay on the task's device for every setting."""
    import ray

    node = ray.get_runtime_context().get_node_id()  # where the probe ran: the summary lists the nodes
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model = teacher.to(device).eval()

    def on_device(arrays: Arrays) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.to(device), y.to(device)) for x, y in eval_batches(arrays, meta, batch_size)]

    batches = on_device(calib)
    if layer is None:
        return {"baseline": score(model, batches), "node": node}
    recalib = on_device(train) if train is not None else None
    return {"rows": probe_layer(model, layer, settings, batches, recalib), "node": node}


def _read_part(path: Path, key: str) -> dict[str, Any] | None:
    """A finished part with this key, or None (absent, unreadable or another key: redone)."""
    try:
        part = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("key") == key else None


def sensitivity(cfg: SensitivityConfig) -> dict[str, Any]:
    """Probe every conv/linear layer of ``--teacher`` at every setting on the current Ray
    cluster; returns the summary the CLI prints (``OUT/sensitivity.json`` holds it too)."""
    import ray

    teacher, meta = check_inputs(cfg)
    out = Path(cfg.out).expanduser().absolute()
    settings = cfg.settings()
    calib = load_arrays(cfg.data, "val", limit=cfg.calib_images)
    train = load_arrays(cfg.data, "train", limit=cfg.bn_batches * cfg.batch_size) if cfg.bn_recalib else None
    common = {
        "version": PROBE_VERSION,
        "teacher": file_checksum(cfg.teacher),
        "calib": _digest(calib),
        "train": _digest(train),
        "input": {k: meta.get(k) for k in ("mean", "std", "preprocess")},
        "batch_size": cfg.batch_size,
        "bn": [cfg.bn_recalib, cfg.bn_batches],
    }
    layers = layer_names(teacher)
    jobs: dict[str | None, str] = {None: _key(common, "baseline")}
    jobs.update({name: _key(common, name, [(s.kind, s.value) for s in settings]) for name in layers})
    parts: dict[str | None, dict[str, Any]] = {}
    for name, key in jobs.items():
        found = _read_part(out / PARTS / f"{key[:24]}.json", key)
        if found is not None:
            parts[name] = found
    todo = [name for name in jobs if name not in parts]
    say(
        f"[effray sensitivity] {len(layers)} layers x {len(settings)} settings on {len(calib['label'])} val images: "
        f"{len(todo)} task(s) to run, {len(parts)} part(s) reused"
    )
    if todo:
        task = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=2)(probe_task)
        refs = (ray.put(teacher), ray.put(calib), ray.put(train) if train is not None else None)
        threads, use_gpu = max(1, math.floor(cfg.cpus_per_task)), cfg.gpus_per_task > 0
        pending = {task.remote(*refs, meta, name, settings, cfg.batch_size, threads, use_gpu): name for name in todo}
        with bar(len(pending), "sensitivity", "layer") as progress:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(done[0])
                part = {"key": jobs[name], "layer": name, **ray.get(done[0])}
                write_json(out / PARTS / f"{jobs[name][:24]}.json", part)  # kept even if a later layer fails
                parts[name] = part
                progress.update(1)
    baseline = parts[None]["baseline"]
    rows = with_drops([r for name in layers for r in parts[name]["rows"]], baseline)
    nodes = sorted({p["node"] for p in parts.values() if p.get("node")})
    return _write_outputs(
        cfg, out, rows, baseline, settings, meta, reused=len(jobs) - len(todo), ran=len(todo), nodes=nodes
    )


def _write_outputs(
    cfg: SensitivityConfig,
    out: Path,
    rows: list[dict[str, Any]],
    baseline: dict[str, Any],
    settings: list[Setting],
    meta: dict[str, Any],
    *,
    reused: int,
    ran: int,
    nodes: list[str],
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string() if t == "string" else getattr(pa, t)()) for c, t in COLUMNS.items()])
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=schema)
    write_file(out / PARQUET, lambda tmp: pq.write_table(table, tmp))
    heatmap = write_heatmap(rows, settings, out / HEATMAP, f"{Path(cfg.teacher).name}: accuracy drop per layer")
    summary = {
        "out": str(out),
        "parquet": str(out / PARQUET),
        "heatmap": heatmap,
        "baseline": baseline,
        "layers": len({r["layer"] for r in rows}),
        "probes": sum(1 for r in rows if not r["skipped_reason"]),
        "skipped": sum(1 for r in rows if r["skipped_reason"]),
        "tasks_run": ran,
        "parts_reused": reused,
        "probed_on_nodes": nodes,
        "worst": worst_per_layer(rows),
    }
    write_json(out / SUMMARY, {**summary, "config": to_dict(cfg), "provenance": provenance(meta)})
    return {**summary, "summary": str(out / SUMMARY)}


def worst_per_layer(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each layer's probe with the largest accuracy drop (ties: the larger loss increase)."""
    worst: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["skipped_reason"]:
            continue
        best = worst.get(r["layer"])
        if best is None or (r["accuracy_drop"], r["loss_increase"]) > (best["accuracy_drop"], best["loss_increase"]):
            worst[r["layer"]] = {
                "setting": Setting(r["kind"], r["value"]).label,
                "accuracy_drop": r["accuracy_drop"],
                "loss_increase": r["loss_increase"],
            }
    return worst


def write_heatmap(rows: list[dict[str, Any]], settings: list[Setting], path: Path, title: str = "") -> str:
    """Layers down, settings across, the accuracy drop in points as colour (grey: skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    column = {(s.kind, s.value): j for j, s in enumerate(settings)}
    grid = np.full((len(layers), len(settings)), np.nan)
    for r in rows:
        if not r["skipped_reason"]:
            grid[layers.index(r["layer"]), column[(r["kind"], r["value"])]] = 100.0 * r["accuracy_drop"]
    fig, ax = plt.subplots(figsize=(3.0 + 0.7 * len(settings), 1.5 + 0.28 * len(layers)))
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="0.85")
    finite = grid[np.isfinite(grid)]
    lo, top = (min(0.0, float(finite.min())), max(1.0, float(finite.max()))) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=top, aspect="auto")
    ax.set_xticks(range(len(settings)), [s.label for s in settings], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    if grid.size <= 600:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="white" if v > top / 2 else "k")
    fig.colorbar(image, ax=ax, label="accuracy drop (points)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
