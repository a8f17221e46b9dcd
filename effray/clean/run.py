"""``effray data clean``: the recipe, top to bottom.

1. hash every image of every split (and of ``--reference``) in a Ray Data pass
   (:mod:`effray.clean.passes`): exact duplicates and exact leaks;
2. fit the ``--folds`` cross-validation models (and, without ``--checkpoint``, one on all
   train rows) as parallel Tune trials: out-of-sample probabilities for the train split;
3. embed every image (and synthetic copies of a seeded sample of train images) with Ray
   Data over an actor pool (:mod:`effray.clean.embed`): pixel thumbnails and descriptors
   (:mod:`effray.clean.pixels`), and, when it holds a classifier, the eval splits'
   probabilities (and its features, for ``--embedder classifier``);
4. the blockwise kNN on Ray tasks with each pair's relative score (:mod:`effray.clean.knn`);
   calibrate the threshold on the copies (:mod:`effray.clean.near`); near duplicates,
   near leaks and the ranked candidate pairs;
5. cleanlab on the probabilities: label issues;
6. removed.parquet, candidates.parquet, the report, the grids and, with ``--drop``, the
   cleaned dataset, all in a temporary sibling of ``--out`` renamed into place at the end.

Without label issues to find in val/test and with the pixel embedder (the default for
near copies), no model is trained or loaded at all.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import effray.compress  # noqa: F401  (registers the compressed formats with the checkpoint loader)
from effray.atomic import replace_dir, temp_sibling
from effray.clean.config import ROW_REASONS, CleanConfig, drop_reasons
from effray.clean.dataset import write_cleaned
from effray.clean.duplicates import exact_findings
from effray.clean.labels import ALL_TRAIN, label_findings, least_confident, run_folds
from effray.clean.near import calibration_copies, near_duplicates
from effray.clean.passes import embed_gpus, embed_pass, hash_pass, sources
from effray.clean.report import (
    candidate_summary,
    save_grids,
    summarise,
    write_candidates,
    write_removed,
    write_report,
)
from effray.config import require
from effray.console import say
from effray.data.arrays import load_arrays
from effray.data.pipeline import validate_data_dir
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.train.checkpoint import load_checkpoint

TOP_ISSUES = 20  # label issues listed in clean_report.md
FILES = [
    "removed.parquet",
    "candidates.parquet",
    "clean_report.json",
    "clean_report.md",
    "duplicates.png",
    "candidates.png",
    "label_issues.png",
]


def check_checkpoint(
    path: str, meta: dict[str, Any], flag: str = "--checkpoint", trust_code: bool = False
) -> dict[str, Any]:
    """The checkpoint's payload, if it fits the dataset (class count, image shape); ``flag``
    names the option it came from in the one-line error."""
    require(Path(path).exists(), f"{flag} {path} does not exist; pass a checkpoint from effray train")
    _, payload = load_checkpoint(path, trust_code)
    info = payload.get("data") or {}
    classes, shape = info.get("num_classes"), info.get("image_shape")
    require(
        classes == meta["num_classes"],
        f"{flag} {path} is for {classes} classes, {meta['source']} has "
        f"{meta['num_classes']}; pass a checkpoint trained on this dataset's classes (or none: one is trained here)",
    )
    require(  # a model that records its preprocessing takes rows of any size, as evaluate feeds it
        shape is None or list(shape) == list(meta["image_shape"]) or bool(info.get("preprocess")),
        f"{flag} {path} takes {shape} images, the dataset's are {meta['image_shape']} and it records no "
        "preprocessing to resize them; pass one trained on them (or at another size with its --augment's resize)",
    )
    require("mean" in info, f"{flag} {path} records no normalisation; pass a checkpoint from effray train")
    return payload


def reference_dataset(spec: str, tmp: Path, meta: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``--reference``: a prepared directory as is; any other source prepared into ``tmp`` first."""
    if not spec:
        return None
    if (Path(spec) / "meta.json").is_file():
        ref = spec
    else:
        ref = str(tmp / "_reference")
        prepare(
            PrepareConfig(source=spec, out=ref, val_fraction=0.0, test_fraction=0.0, classes=",".join(meta["classes"]))
        )
    ref_meta = load_meta(ref)
    require(
        list(ref_meta["image_shape"]) == list(meta["image_shape"]),
        f"--reference {spec} has {ref_meta['image_shape']} images, the dataset {meta['image_shape']}; copies can't "
        "match across sizes",
    )
    return ref, ref_meta


@contextmanager
def _timed(phase_s: dict[str, float], phase: str) -> Iterator[None]:
    """Wall seconds of one phase, for the report: where a clean's time goes at this size."""
    t0 = time.time()
    yield
    phase_s[phase] = round(time.time() - t0, 1)


def clean(cfg: CleanConfig) -> dict[str, Any]:
    """Run the whole step on the current Ray cluster; returns a summary of what it wrote."""
    started, phase_s = time.time(), {}
    out = Path(cfg.out)
    require(
        not out.exists() or cfg.overwrite,
        f"output {str(out)!r} already exists; pass --overwrite to replace it or choose another --out",
    )
    meta = validate_data_dir(cfg.data)
    require("train" in meta["splits"], f"{cfg.data} has no train split to clean")
    given = cfg.checkpoint or cfg.embedder_checkpoint
    flag = "--checkpoint" if cfg.checkpoint else "--embedder"
    payload = check_checkpoint(given, meta, flag, cfg.trust_code) if given else None
    shape, classes = tuple(meta["image_shape"]), list(meta["classes"])
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir(parents=True)
    try:
        # 1. exact copies
        ref = reference_dataset(cfg.reference, tmp, meta)
        read = sources(cfg.data, meta, ref)
        say(
            "[effray] clean: hashing "
            f"{sum(meta['counts'].values()) + (sum(ref[1]['counts'].values()) if ref else 0)} images"
        )
        with _timed(phase_s, "hash"):
            rows = hash_pass(read, shape)
        findings = exact_findings(rows["origin"], rows["index"], rows["label"], rows["hash"])
        already = {(f["split"], f["index"]) for f in findings}

        # 2. the fold models (and, without --checkpoint, one on all train rows: eval probabilities, classifier features)
        train = load_arrays(cfg.data, "train")
        evals = [s for s in ("val", "test") if s in meta["splits"]]
        embed = cfg.near or bool(evals and cfg.labels)
        needs_model = bool(evals and cfg.labels) or (cfg.near and cfg.uses_classifier)
        folds = (list(range(cfg.folds)) if cfg.labels else []) + (
            [ALL_TRAIN] if payload is None and needs_model else []
        )
        gpus = embed_gpus(cfg)
        fits: dict[str, Any] = {"probs": None, "fold_accuracy": [], "model": None}
        if folds:
            say(
                f"[effray] clean: {len(folds)} Tune trials ({cfg.folds if cfg.labels else 0} folds"
                f"{' + one on all train rows' if ALL_TRAIN in folds else ''}), {cfg.epochs} epochs each"
            )
            with _timed(phase_s, "fold_models"):
                fits = run_folds(
                    train,
                    meta,
                    folds,
                    k=cfg.folds,
                    epochs=cfg.epochs,
                    model=cfg.model,
                    width=cfg.width,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed,
                    cpus=cfg.cpus_per_trial,
                    gpus=gpus,
                    storage=str(tmp / "_folds"),
                )
        payload = payload or fits["model"]

        # 3-4. the embedding pass, near copies
        near_info, emb, candidates = None, None, None
        if embed:
            calib = calibration_copies(cfg, rows, train)
            say(
                f"[effray] clean: embedding {len(rows['index'])} images + {len(calib.copies)} synthetic copies on "
                f"{cfg.actors} actor(s)"
            )
            with _timed(phase_s, "embed"):
                emb, copy_cols = embed_pass(read, calib.copies, payload if needs_model else None, cfg, shape, gpus)
            require(
                np.array_equal(emb["index"], rows["index"]), "the embedding pass lost rows; re-run effray data clean"
            )
            if cfg.near:
                say(f"[effray] clean: blockwise kNN ({cfg.embedder} embedder) and threshold calibration")
                with _timed(phase_s, "knn"):
                    near, near_info, candidates = near_duplicates(cfg, rows, emb, copy_cols, calib, already, shape[2])
                findings += near

        # 5. label issues
        labels_info = None
        if cfg.labels:
            issues, eval_accuracy = label_findings(train, fits["probs"], emb, evals)
            findings += issues
            labels_info = {
                "method": "cleanlab.filter.find_label_issues, ranked by self-confidence",
                "folds": cfg.folds,
                "epochs": cfg.epochs,
                "model": f"{cfg.model} x{cfg.width}",
                "fold_accuracy": [round(a, 4) for a in fits["fold_accuracy"]],
                "eval_model": f"--checkpoint {cfg.checkpoint}"
                if cfg.checkpoint
                else "a model trained on all train rows (Tune trial fold -1)",
                "eval_accuracy": eval_accuracy,
                "top": least_confident(findings, classes, TOP_ISSUES),
            }

        # 6. what was found, and with --drop the dataset without it
        reasons = drop_reasons(cfg.drop)
        for f in findings:
            f["dropped"] = ROW_REASONS[f["reason"]] in reasons
        shutil.rmtree(tmp / "_folds", ignore_errors=True)
        files = list(FILES)
        write_removed(tmp / "removed.parquet", findings)
        write_candidates(tmp / "candidates.parquet", candidates, rows)
        save_grids(tmp, findings, candidates, rows, cfg.data, train, ref, classes, cfg.grid_groups)
        dropped = None
        if reasons:
            cleaning = {
                "reference": cfg.reference or None,
                "near_threshold": near_info["threshold"] if near_info else None,
            }
            dropped = write_cleaned(tmp / "data", cfg.data, meta, findings, reasons, cleaning)
            files.append("data/")
        report = {
            "data": os.path.abspath(cfg.data),
            "data_checksum": meta.get("source_checksum", ""),
            "reference": cfg.reference or None,
            "reference_rows": sum(ref[1]["counts"].values()) if ref else 0,
            "rows": meta["counts"],
            "classes": classes,
            **summarise(findings, classes),
            "near": near_info,
            "candidates": candidate_summary(candidates),
            "labels": labels_info,
            "dropped": dropped,
            "files": files,
            "settings": cfg.settings(),
            "seconds": round(time.time() - started, 1),
            "phase_seconds": phase_s,
        }
        write_report(tmp, report)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out.resolve()),
        "counts": report["counts"],
        "near_threshold": near_info["threshold"] if near_info else None,
        "dropped": dropped,
        "seconds": report["seconds"],
        "phase_seconds": phase_s,
    }
