"""``effray predict``: batch inference on Ray Data.

read -> decode (:mod:`effray.deploy.inputs`) -> the model in an actor pool ->
``OUT/predictions.parquet`` + ``OUT/skipped.parquet``. An image that can't be used (unreadable, corrupt)
is a skipped row with its reason, never an error; one of another size than the model takes is resized
by the model's preprocessing, and its ``resized_from`` column says from what: one bad file in a million must not cost
the other 999,999. Images travel as uint8 (a quarter of float32's bytes) and each actor's
:class:`~effray.deploy.model.Deployable`, loaded once in ``__init__``, normalises them on
its device. The driver writes the results as they stream in (a few numbers per row, so one
file and no storage shared between nodes) into a hidden directory renamed into place at the
end: ``OUT`` appears whole or not at all.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from effray.atomic import replace_dir, temp_sibling, write_json
from effray.config import require, to_dict
from effray.console import say
from effray.deploy.config import PredictConfig
from effray.deploy.inputs import NO_LABEL, Inputs, plan_inputs
from effray.deploy.model import load_deployable
from effray.errors import EffrayError

# ------------------------------------------------------------------ the model actor


class Classifier:
    """One model per actor, loaded once; scores the good rows of each batch and passes the
    skipped ones through with their reason."""

    def __init__(self, model: str, kind: str, top_k: int, threads: int, trust_code: bool = False) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.deployable = load_deployable(model, device="auto", kind=kind, trust_code=trust_code)
        self.classes = np.asarray(self.deployable.info.classes, dtype=object)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n, k = len(ok), self.top_k
        top = np.full((n, k), NO_LABEL, np.int64)
        top_p = np.zeros((n, k), np.float32)
        started = time.perf_counter()
        if ok.any():
            logits = self.deployable.logits(batch["image"][ok])
            probs = self.deployable.calibrated(logits)
            order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            top[ok], top_p[ok] = order, np.take_along_axis(probs, order, axis=1)
        seconds = time.perf_counter() - started
        predicted = top[:, 0]
        return {
            "index": batch["index"],
            "name": batch["name"],
            "label": batch["label"],
            "error": batch["error"],
            "resized_from": batch["resized_from"],
            "predicted": predicted,
            "class_name": np.where(ok, self.classes[np.maximum(predicted, 0)], ""),
            "probability": top_p[:, 0],
            "top_k_labels": top,
            "top_k_probabilities": top_p,
            # this call's model time, spread over its rows: the sum over rows is the time in the model
            "model_s": np.where(ok, seconds / max(1, int(ok.sum())), 0.0),
        }


def resolve_resources(cfg: PredictConfig, cluster: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor): ``-1`` GPUs means one when the cluster has any; ``0``
    actors means one per GPU share, else one per 2 CPUs."""
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor >= 0 else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
    require(
        gpus == 0 or cluster.get("GPU", 0) >= gpus,
        f"--gpus-per-actor {gpus:g} but the cluster has {cluster.get('GPU', 0):g} GPUs; pass --gpus-per-actor 0 to "
        "run on CPUs",
    )
    if cfg.actors:
        return cfg.actors, gpus
    if gpus > 0:
        return max(1, int(cluster["GPU"] // gpus)), gpus
    return max(1, int(cluster.get("CPU", 1)) // 2), gpus


# ------------------------------------------------------------------ the command


def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Predict every row of ``--data`` with ``--model`` on the current Ray cluster; write
    ``OUT/predictions.parquet``, ``OUT/skipped.parquet`` and ``OUT/predict.json``."""
    import ray

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EffrayError(f"output {str(out)!r} already exists; pass --overwrite to replace it or choose another --out")
    # a bad model fails here, in one line
    info = load_deployable(cfg.model, device="cpu", kind=cfg.kind, trust_code=cfg.trust_code).info
    require(cfg.top_k <= info.num_classes, f"--top-k {cfg.top_k} is more than the model's {info.num_classes} classes")
    inputs = plan_inputs(cfg.data, cfg.split, info.image_shape, info.num_classes, info.resize)
    require(inputs.rows > 0, f"{inputs.spec} has no rows to predict")
    actors, gpus = resolve_resources(cfg, ray.cluster_resources())
    scored = inputs.dataset.map_batches(
        Classifier,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "model": str(Path(cfg.model).absolute()),
            "kind": cfg.kind,
            "top_k": cfg.top_k,
            "threads": int(cfg.cpus_per_actor),
            "trust_code": cfg.trust_code,
        },
    )
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        tally = write_predictions(scored.iter_batches(batch_size=None, batch_format="numpy"), tmp, inputs.labelled)
        seconds = time.perf_counter() - started
        result = _result(info, inputs, tally, seconds, actors, gpus, out)
        write_json(tmp / "predict.json", {**result, "config": to_dict(cfg), "model_info": info.to_dict()})
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"[effray] predict: {tally['predicted']} images in {seconds:.1f} s (actor start included), "
        f"{result['images_per_s']:.0f} images/s ({actors} actor{'s' if actors > 1 else ''}, {gpus:g} GPU each; in "
        "the model "
        f"{result['model_images_per_s']:.0f} images/s per actor); {tally['skipped']} skipped"
        + (f", {tally['resized']} resized to {'x'.join(map(str, info.image_shape[:2]))}" if tally["resized"] else "")
        + f" -> {out}"
    )
    return result


def write_predictions(batches: Any, out_dir: Path, labelled: bool) -> dict[str, Any]:
    """Stream scored batches into ``predictions.parquet`` and ``skipped.parquet`` under
    ``out_dir``; returns the counts (and correct predictions when ``labelled``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pred_schema = pa.schema(
        [
            ("index", pa.int64()),
            ("name", pa.string()),
            ("label", pa.int64()),
            ("predicted", pa.int64()),
            ("class_name", pa.string()),
            ("probability", pa.float32()),
            ("top_k_labels", pa.list_(pa.int64())),
            ("top_k_probabilities", pa.list_(pa.float32())),
            ("resized_from", pa.string()),  # "HxW" of an image the model's preprocessing resized, else null
        ]
    )
    skip_schema = pa.schema([("index", pa.int64()), ("name", pa.string()), ("reason", pa.string())])
    tally: dict[str, Any] = {
        "predicted": 0,
        "skipped": 0,
        "resized": 0,
        "correct": 0,
        "model_s": 0.0,
        "skipped_examples": [],
    }
    with (
        pq.ParquetWriter(out_dir / "predictions.parquet", pred_schema) as preds,
        pq.ParquetWriter(out_dir / "skipped.parquet", skip_schema) as skipped,
    ):
        for b in batches:
            ok = b["error"] == ""
            if (~ok).any():
                rows = {"index": b["index"][~ok], "name": b["name"][~ok].tolist(), "reason": b["error"][~ok].tolist()}
                skipped.write_table(pa.table(rows, schema=skip_schema))
                tally["skipped"] += int((~ok).sum())
                tally["skipped_examples"] += [f"{n}: {r}" for n, r in zip(rows["name"], rows["reason"])][
                    : 10 - len(tally["skipped_examples"])
                ]
            if not ok.any():
                continue
            k = b["top_k_labels"].shape[1]
            labels = b["label"][ok]
            rows = {
                "index": b["index"][ok],
                "name": b["name"][ok].tolist(),
                "label": pa.array(labels, pa.int64(), mask=labels == NO_LABEL),
                "predicted": b["predicted"][ok],
                "class_name": b["class_name"][ok].tolist(),
                "probability": b["probability"][ok],
                "top_k_labels": pa.FixedSizeListArray.from_arrays(pa.array(b["top_k_labels"][ok].ravel()), k).cast(
                    pa.list_(pa.int64())
                ),
                "top_k_probabilities": pa.FixedSizeListArray.from_arrays(
                    pa.array(b["top_k_probabilities"][ok].ravel()), k
                ).cast(pa.list_(pa.float32())),
                "resized_from": [r or None for r in b["resized_from"][ok].tolist()],
            }
            preds.write_table(pa.table(rows, schema=pred_schema))
            tally["predicted"] += int(ok.sum())
            tally["resized"] += int((b["resized_from"][ok] != "").sum())
            tally["model_s"] += float(b["model_s"][ok].sum())
            if labelled:
                tally["correct"] += int((b["predicted"][ok] == labels).sum())
    return tally


def _result(
    info: Any, inputs: Inputs, tally: dict[str, Any], seconds: float, actors: int, gpus: float, out: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "out": str(out.absolute()),
        "predictions": str((out / "predictions.parquet").absolute()),
        "skipped_file": str((out / "skipped.parquet").absolute()),
        "data": inputs.spec,
        "data_kind": inputs.kind,
        "rows": tally["predicted"] + tally["skipped"],
        "predicted": tally["predicted"],
        "skipped": tally["skipped"],
        "resized": tally["resized"],  # images of another size, brought to the model's by its preprocessing
        "skipped_examples": tally["skipped_examples"],
        "seconds": round(seconds, 3),
        "images_per_s": round(tally["predicted"] / max(seconds, 1e-9), 1),
        "model_images_per_s": round(tally["predicted"] / max(tally["model_s"], 1e-9), 1) if tally["predicted"] else 0.0,
        "actors": actors,
        "gpus_per_actor": gpus,
        "model": {"kind": info.kind, "source": info.source},
    }
    if inputs.labelled and tally["predicted"]:
        result["accuracy"] = tally["correct"] / tally["predicted"]
    return json.loads(json.dumps(result, default=str))
