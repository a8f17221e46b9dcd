"""``effray compress``: one teacher -> one measured artifact, fine-tuned on Ray Train.

Two levels, as in :mod:`effray.train.run` / :mod:`effray.train.loop`:

* :func:`compress` (the driver) checks every user input before any worker starts (bad
  rates or bits, a teacher that doesn't load, a student or dataset with other classes,
  an existing ``--out``), measures the teacher, fits a ``TorchTrainer`` running
  :func:`~effray.compress.worker.compress_loop_per_worker`, then loads the artifact the
  workers wrote, builds its int8 runtime, measures the *file* and writes
  ``OUT/metrics.json`` atomically.
* the workers run the compression hooks on the one training loop
  (:mod:`effray.compress.worker`), as :func:`effray.compress.recipe.compress_local` does in
  one process.

``OUT`` must be visible from the node of rank 0 (one node, or a shared filesystem: checked
on a multi-node cluster); the fine-tuning epochs reach the driver through a mailbox actor
the driver owns (:func:`effray.mailbox.open_mailbox`), never a file on rank 0's node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from effray.atomic import write_json
from effray.compress.allocate import allocated, is_allocated
from effray.compress.artifact import file_checksum
from effray.compress.config import CompressRunConfig
from effray.compress.recipe import measure_artifact, measure_teacher
from effray.compress.steps import build_student
from effray.compress.worker import CompressWorker, compress_loop_per_worker
from effray.config import require, to_dict, validated
from effray.console import relayed_step_bars, say
from effray.data.pipeline import eval_dataset, torch_batches, train_dataset, validate_data_dir
from effray.data.shuffle import cache_split, steps_per_epoch
from effray.mailbox import open_mailbox
from effray.models.reference import provided, trusted_modules
from effray.storage import check_storage_for_cluster
from effray.train.checkpoint import checkpoint_file, data_summary, load_checkpoint
from effray.train.parallel import STRATEGIES
from effray.train.run import provenance, train_rows
from effray.train.trainer import check_resources, fit, torch_trainer
from effray.train.validate import CorruptionScore

METRICS_FILE = "metrics.json"


def xy_batches(torch_iter: Any) -> Any:
    """(image, label) pairs from :func:`torch_batches` dicts: what the recipe consumes."""
    for b in torch_iter:
        yield b["image"], b["label"]


def eval_and_calib(data_dir: str, meta: dict[str, Any], batch: int, calib_batches: int) -> tuple[list, Any, list]:
    """Validation batches, the calibration dataset (first rows of train, unaugmented, the
    same on every rank) and its batches."""

    evals = list(xy_batches(torch_batches(eval_dataset(data_dir, "val"), meta, batch)))
    calib_ds = eval_dataset(data_dir, "train").limit(batch * calib_batches).materialize()
    return evals, calib_ds, list(xy_batches(torch_batches(calib_ds, meta, batch)))


def teacher_baseline(teacher: Any, teacher_path: str, evals: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher measured as an fp32 artifact (every ratio's denominator) and where it came from."""

    metrics = measure_teacher(teacher, evals)
    info = {
        "checksum": file_checksum(checkpoint_file(teacher_path)),
        "spec": dict(teacher.spec),
        "path": str(Path(teacher_path).resolve()),
    }
    return metrics, info


def teacher_input(meta: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The dataset's meta as the teacher sees it: its preprocessing (``preprocess``, which
    every batch goes through before the normalisation) and its input (``model_input``, what
    the student's artifact records). A student takes what its teacher takes, whatever size
    the rows are stored at."""
    data = payload.get("data") or {}
    model_input = {k: data[k] for k in ("image_shape", "preprocess") if k in data}
    return {**meta, "preprocess": data.get("preprocess"), "model_input": model_input}


def check_inputs(rc: CompressRunConfig) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Every check that can fail on user input, writing nothing: ``(teacher, payload, meta)``."""

    validated(rc)
    out = Path(rc.out)
    require(
        not out.exists() or rc.overwrite or (out.is_dir() and not any(out.iterdir())),
        f"--out {rc.out} already exists; pass --overwrite to replace it, or choose another directory",
    )
    require(not out.exists() or out.is_dir(), f"--out {rc.out} is a file, not a directory")
    meta = validate_data_dir(rc.data.data)
    require(
        "val" in meta["splits"] and meta["counts"].get("val", 0) > 0,
        f"dataset {rc.data.data} has no validation split; re-prepare it with --val-fraction > 0",
    )
    teacher, payload = load_checkpoint(rc.compress.teacher, rc.trust_code or trusted_modules(rc.compress.student))
    spec = dict(getattr(teacher, "spec", {}) or payload.get("model_spec", {}))
    require(
        int(spec.get("num_classes", -1)) == int(meta["num_classes"]),
        f"teacher {rc.compress.teacher} predicts {spec.get('num_classes')} classes, {rc.data.data} has "
        f"{meta['num_classes']}; use the dataset it was trained on",
    )
    teacher.spec = spec
    build_student(teacher, rc.compress)  # a student with other classes/inputs fails here, in one line
    return teacher, payload, teacher_input(meta, payload)


def worker_batches(rc: CompressRunConfig, meta: dict[str, Any]) -> tuple[int, int]:
    """(training rows per worker, batch per worker), refused in one line when a worker
    would get no full batch."""

    rows = train_rows(rc.data, meta) // rc.workers
    per_worker = max(1, rc.compress.finetune_batch_size // rc.workers)
    require(
        rows >= per_worker,
        f"{train_rows(rc.data, meta)} training rows can't give {rc.workers} workers a batch of "
        f"{per_worker}; use fewer workers or a smaller --finetune-batch-size",
    )
    return rows, per_worker


def fine_tune_on_workers(
    rc: CompressRunConfig,
    meta: dict[str, Any],
    calib_ds: Any,
    teacher_info: dict[str, Any],
    *,
    name: str,
    storage: str,
    callbacks: list[Any] | None = None,
    max_failures: int = 0,
    report_extra: dict[str, Any] | None = None,
    step_bar: bool = False,
    corruption: CorruptionScore | None = None,
) -> dict[str, Any]:
    """Fit the ``TorchTrainer`` running :func:`compress_loop_per_worker` on ``rc.workers``
    workers; rank 0 writes the artifact to ``rc.out`` (absolute). ``name``/``storage`` are
    Ray Train's run (deterministic names restore, from the last epoch's checkpoint);
    ``callbacks`` e.g. Tune's ``TuneReportCallback`` (``report_extra`` joins every epoch's
    report: a Tune trial's predicted costs); ``max_failures`` restarts after a dead
    worker or node, each from that checkpoint; ``step_bar``: rank 0's per-step bar on this
    terminal (`effray compress`; not a Tune trial, whose output is a log); ``corruption``:
    scored by rank 0 after every epoch (``val_corruption_accuracy``). Returns the epochs
    as the workers saw them (``{"epochs", "final", "world"}``)."""
    import ray

    rows, per_worker = worker_batches(rc, meta)
    run_id = uuid.uuid4().hex[:8]
    clock, box = f"effray-compress-clock-{run_id}", f"effray-compress-results-{run_id}"
    mailbox = open_mailbox(box)
    out = Path(rc.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # as `effray train`: a split that fits the object store is reshuffled exactly every epoch
    source = cache_split(rc.data, num_cpus=rc.data_cpus)
    train_ds = None if source is not None else train_dataset(rc.data, clock=clock, num_cpus=rc.data_cpus)
    worker = CompressWorker(
        run=rc,
        teacher=str(Path(rc.compress.teacher).resolve()),
        mailbox=box,
        teacher_info=teacher_info,
        run_dir=os.path.join(storage, name) if "://" not in storage else "",
        data=data_summary(meta, meta.get("model_input")),
        meta=meta,
        clock=clock,
        steps_per_epoch=(
            steps_per_epoch(source.rows, per_worker * rc.workers, rc.workers)
            if source is not None
            else math.ceil(rows / per_worker)
        ),
        report_extra=dict(report_extra or {}),
        train_source=source,
        factories=provided(),
        progress=f"effray-steps-{run_id}" if step_bar else "",
        corruption=corruption,
    )
    trainer = torch_trainer(
        compress_loop_per_worker,
        {"worker": to_dict(worker)},
        workers=rc.workers,
        cpus_per_worker=rc.cpus_per_worker,
        gpus_per_worker=rc.gpus_per_worker,
        name=name,
        storage=storage,
        max_failures=max_failures,
        callbacks=callbacks,
        datasets={
            **({"train": train_ds} if train_ds is not None else {}),
            "val": eval_dataset(rc.data.data, "val", num_cpus=rc.data_cpus).materialize(),
            "calib": calib_ds,
        },
        dataset_config=STRATEGIES.get("ddp").dataset_config(train_ds=train_ds),
    )
    with relayed_step_bars(worker.progress) if step_bar else contextlib.nullcontext():
        fit(trainer, clock)
    finetune = ray.get(mailbox.get.remote())
    require(finetune is not None, f"the fine-tuning run {name} ended without its results")
    return finetune


def compress(rc: CompressRunConfig) -> dict[str, Any]:
    """Compress ``--teacher`` into ``--out`` on the current Ray cluster; returns the summary
    printed by the CLI (``OUT/metrics.json`` holds the full measurement)."""
    import ray

    teacher, _, meta = check_inputs(rc)
    if is_allocated(rc.compress):  # per-layer bits and rates within the uniform config's bytes
        rc = dataclasses.replace(rc, compress=allocated(teacher, rc.compress, data=meta))
        chosen = rc.compress
        say(
            f"[effray] sensitivity allocation: bits {chosen.layer_bits or '-'}; rates {chosen.layer_rates or '-'}"
            if chosen.allocation == "sensitivity"
            else "[effray] no per-layer allocation fits the uniform config's bytes: compressing it uniformly"
        )
    check_resources(rc, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")])  # type: ignore[arg-type]
    worker_batches(rc, meta)
    out = Path(os.path.abspath(os.path.expanduser(rc.out)))
    rc = dataclasses.replace(rc, out=str(out))
    check_storage_for_cluster(str(out.parent))  # rank 0 writes the artifact there, the driver reads it

    cfg = rc.compress
    evals, calib_ds, calib = eval_and_calib(rc.data.data, meta, rc.eval_batch_size, cfg.calib_batches)
    teacher_metrics, teacher_info = teacher_baseline(teacher, cfg.teacher, evals)
    # Ray Train's run dir (the epochs' checkpoints a restart resumes from) beside OUT, on the
    # storage every node sees; nothing in it outlives the fit
    storage = out.parent / f".{out.name}.finetune-{uuid.uuid4().hex[:6]}"
    try:
        finetune = fine_tune_on_workers(
            rc,
            meta,
            calib_ds,
            teacher_info,
            name=f"compress-{out.name}",
            storage=str(storage),
            max_failures=rc.max_failures,
            step_bar=True,
        )
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    student, payload = measure_artifact(out, cfg, calib, evals, teacher_metrics)
    if student.get("int8_skipped"):
        say(f"[effray] int8 runtime not measured: {student['int8_skipped']}")
    metrics = {
        **student,
        "teacher": teacher_metrics,
        "method": payload.get("method", {}),
        "config": to_dict(rc),
        "finetune": finetune,
        "provenance": provenance(meta),
    }
    write_json(out / METRICS_FILE, metrics)
    ratios = student.get("vs_teacher", {})
    return {
        "out": str(out),
        "artifact": str(checkpoint_file(out)),
        "metrics": str(out / METRICS_FILE),
        "accuracy": student["accuracy"],
        "teacher_accuracy": teacher_metrics["accuracy"],
        "bytes": student["bytes"],
        "params": student["params"],
        "nonzero_params": student["nonzero_params"],
        "macs": student["macs"],
        "size_ratio": ratios.get("size_ratio"),
        "macs_ratio": ratios.get("macs_ratio"),
        "accuracy_drop_points": ratios.get("accuracy_drop_points"),
        **{k: student.get(k) for k in ("ece", "temperature", "ece_scaled")},  # T: recorded in the artifact
        "workers": rc.workers,
    }
