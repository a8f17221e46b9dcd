"""``effray data clean``: the recipe, top to bottom.

1. hash every image of every split (and of ``--reference``) in a Ray Data pass: exact
   duplicates and exact leaks;
2. fit the ``--folds`` cross-validation models (and, without ``--checkpoint``, one on all
   train rows) as parallel Tune trials: out-of-sample probabilities for the train split;
3. embed every image (and light copies of a seeded sample of train images) with Ray Data
   over an actor pool holding that model (:mod:`effray.clean.embed`): the eval splits'
   probabilities come out of the same pass;
4. blockwise cosine kNN on Ray tasks (:mod:`effray.clean.knn`); calibrate the threshold on
   the copies (:mod:`effray.clean.calibrate`); near duplicates and near leaks;
5. cleanlab on the probabilities: label issues;
6. removed.parquet, the report, the grids and, with ``--drop``, the cleaned dataset,
   all in a temporary sibling of ``--out`` renamed into place at the end.
"""

from __future__ import annotations

import hashlib
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
from effray.clean.calibrate import DEFINITION, choose_threshold, light_copies
from effray.clean.config import ROW_REASONS, CleanConfig, drop_reasons
from effray.clean.dataset import arrays_table, without_rows, write_dataset
from effray.clean.duplicates import exact_findings, hash_rows, near_findings
from effray.clean.embed import PIXEL_GRID, ZOOMS, Embedder, finish
from effray.clean.knn import knn, row_similarity
from effray.clean.labels import ALL_TRAIN, label_issues, run_folds
from effray.clean.report import save_issue_grid, save_pairs_grid, summarise, write_removed, write_report
from effray.config import require
from effray.console import say
from effray.data.arrays import load_arrays
from effray.data.pipeline import decode_batch, validate_data_dir
from effray.data.prepare import PrepareConfig, load_meta, prepare, split_files
from effray.train.checkpoint import load_checkpoint

ORIGINS = ("train", "val", "test", "reference")
TOP_ISSUES = 20  # label issues listed in clean_report.md


def _check_checkpoint(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The --checkpoint's payload, if it fits the dataset (class count, image shape)."""

    _, payload = load_checkpoint(path)
    info = payload.get("data") or {}
    classes, shape = info.get("num_classes"), info.get("image_shape")
    require(
        classes == meta["num_classes"],
        f"--checkpoint {path} is for {classes} classes, {meta['source']} has "
        f"{meta['num_classes']}; pass a checkpoint trained on this dataset's classes (or none: one is trained here)",
    )
    require(
        shape is None or list(shape) == list(meta["image_shape"]),
        f"--checkpoint {path} takes {shape} images, the dataset's are {meta['image_shape']}; pass one trained on them",
    )
    require("mean" in info, f"--checkpoint {path} records no normalisation; pass a checkpoint from effray train")
    return payload


def _reference(spec: str, tmp: Path, meta: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A prepared directory as is; any other source prepared into ``tmp`` first."""
    if not spec:
        return None
    if (Path(spec) / "meta.json").is_file():
        ref = spec
    else:
        ref = str(tmp / "_reference")
        prepare(PrepareConfig(source=spec, out=ref, val_fraction=0.0, classes=",".join(meta["classes"])))
    ref_meta = load_meta(ref)
    require(
        list(ref_meta["image_shape"]) == list(meta["image_shape"]),
        f"--reference {spec} has {ref_meta['image_shape']} images, the dataset {meta['image_shape']}; copies can't "
        "match across sizes",
    )
    return ref, ref_meta


def _sources(
    cfg: CleanConfig, meta: dict[str, Any], ref: tuple[str, dict[str, Any]] | None
) -> list[tuple[str, str, str]]:
    """``(directory, split, origin)`` of everything read, in :data:`ORIGINS` order."""
    out = [(cfg.data, s, s) for s in ORIGINS if s in meta["splits"]]
    if ref is not None:
        out += [(ref[0], s, "reference") for s in ref[1]["splits"]]
    return out


def _decode_tagged(batch: Any, *, shape: tuple[int, ...], origin: str) -> dict[str, np.ndarray]:

    d = decode_batch(batch, shape)
    return {
        "image": d["image"],
        "label": d["label"],
        "index": d["index"].astype(np.int64),
        "origin": np.array([origin] * len(d["label"]), dtype=object),
    }


def _collect(ds: Any, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}


def _ordered(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by (origin in :data:`ORIGINS` order, index): positions mean the same in every pass."""
    rank = np.array([ORIGINS.index(o) if o in ORIGINS else len(ORIGINS) for o in cols["origin"]])
    order = np.lexsort((cols["index"], rank))
    return {k: v[order] for k, v in cols.items()}


def hash_pass(sources: list[tuple[str, str, str]], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """origin, index, label, hash of every row: one Ray Data ``map_batches`` of pure hashing."""
    import ray

    parts = [
        ray.data.read_parquet(split_files(d, s), columns=["image", "label", "index"]).map_batches(
            hash_rows, batch_format="pyarrow", fn_kwargs={"shape": shape, "origin": o}
        )
        for d, s, o in sources
    ]
    return _ordered(
        _collect(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], ("origin", "index", "label", "hash"))
    )


def embed_pass(
    sources: list[tuple[str, str, str]],
    copies: np.ndarray,
    payload: dict[str, Any],
    cfg: CleanConfig,
    shape: tuple[int, ...],
    gpus: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Views and probabilities of every row, and of the calibration copies (origin "copy")."""
    import ray

    parts = [
        ray.data.read_parquet(split_files(d, s), columns=["image", "label", "index"]).map_batches(
            _decode_tagged, batch_format="pyarrow", fn_kwargs={"shape": shape, "origin": o}
        )
        for d, s, o in sources
    ]
    if len(copies):
        table = arrays_table(copies, np.zeros(len(copies), np.int64), np.arange(len(copies)), "train").select(
            ["image", "label", "index"]
        )
        parts.append(
            ray.data.from_arrow(table).map_batches(
                _decode_tagged, batch_format="pyarrow", fn_kwargs={"shape": shape, "origin": "copy"}
            )
        )
    info = payload["data"]
    ds = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).map_batches(
        Embedder,
        fn_constructor_kwargs={"payload": payload, "mean": info["mean"], "std": info["std"]},
        batch_size=256,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=1,
        num_gpus=gpus,
    )
    cols = _collect(ds, ("origin", "index", "label", "views", "probs"))
    is_copy = cols["origin"] == "copy"
    rows = _ordered({k: v[~is_copy] for k, v in cols.items()})
    order = np.argsort(cols["index"][is_copy])
    return rows, {k: v[is_copy][order] for k, v in cols.items()}


def _gpus(cfg: CleanConfig) -> float:
    import ray

    if cfg.gpus_per_actor >= 0:
        return cfg.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _near(
    cfg: CleanConfig,
    rows: dict[str, np.ndarray],
    emb: dict[str, np.ndarray],
    copies: dict[str, np.ndarray],
    sample: np.ndarray,
    kinds: np.ndarray,
    already: set[tuple[str, int]],
    channels: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """kNN over the embeddings, the calibrated threshold and the near findings."""

    fdim = int(emb["views"].shape[2] - channels * PIXEL_GRID * PIXEL_GRID)  # the model part; the rest is pixels
    dataset_rows = np.flatnonzero(emb["origin"] != "reference")
    n_all = len(emb["origin"])
    both = finish(np.concatenate([emb["views"], copies["views"]]), fdim, rows=dataset_rows)
    keys, copy_emb = both[:n_all], both[n_all:]
    nq = len(dataset_rows)  # the dataset's rows come first (ORIGINS order), the reference's last
    scores, neighbours = knn(keys[:nq], keys, cfg.neighbours, cfg.block_rows)
    # calibration: each sampled image against its light copies and its nearest other real image
    positives = row_similarity(keys[sample[copies["source"]]], copy_emb)
    hashes = rows["hash"]
    negatives = []
    for p in sample:
        other = [s for j, s in zip(neighbours[p], scores[p]) if j >= 0 and hashes[j] != hashes[p]]
        if other:
            negatives.append(other[0])
    calibrated = choose_threshold(positives, np.array(negatives), cfg.max_fpr)
    threshold = cfg.near_threshold or calibrated["threshold"]
    recall = {k: float((positives[kinds == k] >= threshold).mean()) for k in dict.fromkeys(kinds)}
    tpr = float((positives >= threshold).mean())
    clean_neg = np.array(negatives)[np.array(negatives) < np.median(positives)]
    fpr = float((clean_neg >= threshold).mean()) if len(clean_neg) else 0.0
    found = near_findings(
        rows["origin"], rows["index"], rows["label"], neighbours, scores, np.arange(nq), threshold, already
    )
    info = {
        "threshold": float(threshold),
        "source": "--near-threshold"
        if cfg.near_threshold
        else f"calibrated: largest TPR - FPR at FPR <= {cfg.max_fpr:g}",
        "calibrated_threshold": calibrated["threshold"],
        "definition": DEFINITION,
        "calibration_images": int(len(sample)),
        "copies": int(len(positives)),
        "recall": tpr,
        "recall_per_kind": recall,
        "real_images_above": fpr,
        "with_own_copy": calibrated["trimmed"],
        "meaning": (
            f"At this similarity {tpr:.1%} of {len(positives)} light copies of {len(sample)} train images are "
            f"found, and {fpr:.1%} of those real images have a different real image above it "
            f"(leaving out {calibrated['trimmed']} whose nearest image is as close as a typical copy: they have "
            "copies of their own)."
        ),
        "embedding": (
            f"classifier penultimate features (flip-symmetric, centred) + {PIXEL_GRID}x{PIXEL_GRID} pixels, "
            f"best of {len(ZOOMS)} zoom views ({', '.join(map(str, ZOOMS))} px cut per side)"
        ),
        "neighbours": cfg.neighbours,
        "block_rows": cfg.block_rows,
    }
    return found, info


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
    payload = _check_checkpoint(cfg.checkpoint, meta) if cfg.checkpoint else None
    shape, classes = tuple(meta["image_shape"]), list(meta["classes"])
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir(parents=True)
    try:
        ref = _reference(cfg.reference, tmp, meta)
        sources = _sources(cfg, meta, ref)
        say(
            "[effray] clean: hashing "
            f"{sum(meta['counts'].values()) + (sum(ref[1]['counts'].values()) if ref else 0)} images"
        )
        with _timed(phase_s, "hash"):
            rows = hash_pass(sources, shape)
        findings = exact_findings(rows["origin"], rows["index"], rows["label"], rows["hash"])
        already = {(f["split"], f["index"]) for f in findings}
        train = load_arrays(cfg.data, "train")
        evals = [s for s in ("val", "test") if s in meta["splits"]]
        folds = (list(range(cfg.folds)) if cfg.labels else []) + (
            [ALL_TRAIN] if payload is None and (cfg.near or evals and cfg.labels) else []
        )
        gpus = _gpus(cfg)
        fits: dict[str, Any] = {"probs": None, "fold_accuracy": [], "model": None}
        if folds:
            say(
                f"[effray] clean: {len(folds)} Tune trials ({cfg.folds if cfg.labels else 0} folds"
                f"{' + the embedding model' if ALL_TRAIN in folds else ''}), {cfg.epochs} epochs each"
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
        near_info, emb = None, None
        if payload is not None and (cfg.near or evals and cfg.labels):
            train_pos = {int(i): p for p, i in enumerate(train["index"])}
            n_train = int(np.sum(rows["origin"] == "train"))
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xCA1B]))
            sample = (
                np.sort(rng.choice(n_train, min(cfg.calibration, n_train), replace=False))
                if cfg.near
                else np.zeros(0, np.int64)
            )
            images = (
                train["image"][[train_pos[int(i)] for i in rows["index"][sample]]]
                if len(sample)
                else train["image"][:0]
            )
            copies, source, kinds = light_copies(images, seed=cfg.seed)
            changed = np.any(copies.reshape(len(copies), -1) != images[source].reshape(len(copies), -1), axis=1)
            copies, source, kinds = (
                copies[changed],
                source[changed],
                kinds[changed],
            )  # a JPEG copy can be pixel-identical
            say(
                f"[effray] clean: embedding {len(rows['index'])} images + {len(copies)} light copies on {cfg.actors} "
                "actor(s)"
            )
            with _timed(phase_s, "embed"):
                emb, copy_cols = embed_pass(sources, copies, payload, cfg, shape, gpus)
            require(
                np.array_equal(emb["index"], rows["index"]), "the embedding pass lost rows; re-run effray data clean"
            )
            if cfg.near:
                copy_cols["source"] = source
                say("[effray] clean: blockwise kNN and threshold calibration")
                with _timed(phase_s, "knn"):
                    near, near_info = _near(cfg, rows, emb, copy_cols, sample, kinds, already, shape[2])
                findings += near
        labels_info = None
        if cfg.labels:
            label_rows = []
            train_probs = fits["probs"]
            train_labels = train["label"]
            for issue in label_issues(train_labels, train_probs):
                label_rows.append({**issue, "split": "train", "index": int(train["index"][issue["position"]])})
            eval_acc = {}
            for split in evals:
                mask = emb["origin"] == split
                probs, labels = emb["probs"][mask], emb["label"][mask]
                eval_acc[split] = round(float((probs.argmax(1) == labels).mean()), 4)
                for issue in label_issues(labels, probs):
                    label_rows.append({**issue, "split": split, "index": int(emb["index"][mask][issue["position"]])})
            for r in label_rows:
                findings.append(
                    {
                        "split": r["split"],
                        "index": r["index"],
                        "label": r["given"],
                        "reason": "label_issue",
                        "match": None,
                        "duplicate_of_split": None,
                        "duplicate_of_index": None,
                        "score": r["given_confidence"],
                        "given": r["given"],
                        "predicted": r["predicted"],
                        "given_confidence": r["given_confidence"],
                        "predicted_confidence": r["predicted_confidence"],
                        "rank": r["rank"],
                    }
                )
            top = sorted((f for f in findings if f["reason"] == "label_issue"), key=lambda f: f["given_confidence"])[
                :TOP_ISSUES
            ]
            labels_info = {
                "method": "cleanlab.filter.find_label_issues, ranked by self-confidence",
                "folds": cfg.folds,
                "epochs": cfg.epochs,
                "model": f"{cfg.model} x{cfg.width}",
                "fold_accuracy": [round(a, 4) for a in fits["fold_accuracy"]],
                "eval_model": f"--checkpoint {cfg.checkpoint}"
                if cfg.checkpoint
                else "a model trained on all train rows (Tune trial fold -1)",
                "eval_accuracy": eval_acc,
                "top": [
                    {
                        "split": f["split"],
                        "index": f["index"],
                        "given": classes[f["given"]],
                        "predicted": classes[f["predicted"]],
                        "given_confidence": f["given_confidence"],
                        "predicted_confidence": f["predicted_confidence"],
                    }
                    for f in top
                ],
            }
        reasons = drop_reasons(cfg.drop)
        for f in findings:
            f["dropped"] = ROW_REASONS[f["reason"]] in reasons
        shutil.rmtree(tmp / "_folds", ignore_errors=True)
        files = ["removed.parquet", "clean_report.json", "clean_report.md", "duplicates.png", "label_issues.png"]
        write_removed(tmp / "removed.parquet", findings)
        _grids(cfg, tmp, findings, train, ref, classes, save_pairs_grid, save_issue_grid, load_arrays)
        dropped = None
        if reasons:
            gone: dict[str, set[int]] = {}
            for f in findings:
                if f["dropped"]:
                    gone.setdefault(f["split"], set()).add(f["index"])
            tables = {s: without_rows(cfg.data, s, gone.get(s, set())) for s in meta["splits"]}
            ids = ",".join(f"{s}:{i}" for s in sorted(gone) for i in sorted(gone[s]))
            checksum = hashlib.sha256(f"{meta.get('source_checksum', '')}|{ids}".encode()).hexdigest()[:16]
            counts_removed = dict(sorted(summarise([f for f in findings if f["dropped"]], classes)["counts"].items()))
            base = {k: v for k, v in meta.items() if k not in ("counts", "counts_per_class", "mean", "std", "splits")}
            base.update(
                source=f"clean:{os.path.abspath(cfg.data)}",
                source_checksum=checksum,
                cleaning={
                    "source": os.path.abspath(cfg.data),
                    "source_checksum": meta.get("source_checksum", ""),
                    "reasons": reasons,
                    "removed": {s: len(v) for s, v in gone.items()},
                    "removed_by_reason": counts_removed,
                    "reference": cfg.reference or None,
                    "near_threshold": near_info["threshold"] if near_info else None,
                },
            )
            new_meta = write_dataset(tmp / "data", tables, classes, list(shape), base)
            dropped = {"reasons": reasons, "rows": sum(len(v) for v in gone.values()), "counts": new_meta["counts"]}
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


@contextmanager
def _timed(phase_s: dict[str, float], phase: str) -> Iterator[None]:
    """Wall seconds of one phase, for the report: where a clean's time goes at this size."""
    t0 = time.time()
    yield
    phase_s[phase] = round(time.time() - t0, 1)


def _grids(
    cfg: CleanConfig,
    tmp: Path,
    findings: list[dict[str, Any]],
    train: dict[str, np.ndarray],
    ref: Any,
    classes: list[str],
    save_pairs: Any,
    save_issues: Any,
    load_arrays: Any,
) -> None:
    """duplicates.png (the highest-scoring pairs of each reason) and label_issues.png (the
    least self-confident issues)."""
    cache: dict[str, dict[int, np.ndarray]] = {"train": dict(zip(train["index"].tolist(), train["image"]))}

    def image(origin: str, index: int) -> np.ndarray:
        if origin not in cache:
            d, split = (ref[0], None) if origin == "reference" else (cfg.data, origin)
            splits = ref[1]["splits"] if origin == "reference" else [split]
            cache[origin] = {}
            for s in splits:
                a = load_arrays(d, s)
                cache[origin].update(zip(a["index"].tolist(), a["image"]))
        return cache[origin][index]

    dups = [f for f in findings if f["duplicate_of_index"] is not None]
    per = max(1, cfg.grid_groups // max(1, len({f["reason"] for f in dups})))
    chosen = []
    for reason in ("leak", "duplicate", "near_duplicate"):
        chosen += sorted((f for f in dups if f["reason"] == reason), key=lambda f: -f["score"])[:per]
    save_pairs(
        tmp / "duplicates.png",
        [
            (
                image(f["split"], f["index"]),
                image(f["duplicate_of_split"], f["duplicate_of_index"]),
                f"{f['reason']} ({f['match']}) {f['score']:.3f}\n{f['split']} {f['index']} ~ "
                f"{f['duplicate_of_split']} {f['duplicate_of_index']}",
            )
            for f in chosen[: cfg.grid_groups]
        ],
    )
    issues = sorted((f for f in findings if f["reason"] == "label_issue"), key=lambda f: f["given_confidence"])[
        : cfg.grid_groups
    ]
    save_issues(
        tmp / "label_issues.png",
        [
            (
                image(f["split"], f["index"]),
                f"{f['split']} {f['index']}: {classes[f['given']]} -> "
                f"{classes[f['predicted']]}\n({f['predicted_confidence']:.2f})",
            )
            for f in issues
        ],
    )
