"""The driver of `effray train`: check everything, then build and fit a ``TorchTrainer``.

All checks that can fail on user input run here, before any worker starts (Ray would
wait forever for resources the cluster lacks, and a worker's error is retried
``max_failures`` times). The run's name is deterministic, so the same command with the
same ``--storage`` resumes its run: Ray Train V2 restores a run by ``RunConfig(name,
storage_path)`` and hands the newest checkpoint to the workers. A re-run of a run that
already trained its ``--epochs`` (and whose newest checkpoint loads) returns that run's
result without starting a worker.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from effray.atomic import write_file, write_json
from effray.config import require, to_dict
from effray.console import relayed_step_bars, say
from effray.data.augment import input_spec
from effray.data.pipeline import (
    DataConfig,
    eval_dataset,
    train_dataset,
    validate_data_dir,
)
from effray.data.shuffle import cache_split, steps_per_epoch
from effray.models import build_model
from effray.models.reference import provided
from effray.models.weights import describe, initial_weights
from effray.storage import check_storage_for_cluster
from effray.tracking import TrackerSettings, decide_wandb_mode, stable_run_id
from effray.train.checkpoint import data_summary
from effray.train.config import TrainConfig, default_run_name, model_identity, parse_resources
from effray.train.loop import HISTORY_FILE, TrainWorker, train_loop_per_worker
from effray.train.parallel import STRATEGIES
from effray.train.trainer import (
    WORKER_START_TIMEOUT_ENV,
    check_resources,
    finished_run,
    fit,
    fit_cpus_per_worker,
    torch_trainer,
)

RUN_FILE = "effray-run.json"
SUMMARY_KEYS = (
    "epoch",
    "train_loss",
    "val_accuracy",
    "val_loss",
    "val_count",
    "images_per_s",
    "lr",
    "elapsed_s",
    "val_per_class_accuracy",
    "nodes",
)


def train_rows(data: DataConfig, meta: dict[str, Any]) -> int:
    """Rows in the training stream (real + mixed-in synthetic), without reading them."""
    n = int(meta["counts"].get("train", 0))
    if data.synthetic and data.synthetic_ratio > 0:
        n += int(round(data.synthetic_ratio / (1.0 - data.synthetic_ratio) * n))
    return n


def check_existing_run(run_dir: Path, cfg: TrainConfig, meta: dict[str, Any]) -> dict[str, Any] | None:
    """A run of the same name must hold the same architecture, or its checkpoints can't
    load: say so now and touch nothing."""
    f = run_dir / RUN_FILE
    if not f.is_file():
        return None
    old = json.loads(f.read_text())
    want = {**model_identity(to_dict(cfg)), "num_classes": int(meta["num_classes"])}
    have = {**model_identity(old["config"]), "num_classes": int(old["data"]["num_classes"])}
    require(
        want == have,
        f"run {cfg.name!r} in {cfg.storage} holds model {have['model']} (width {have['width']:g}, "
        f"{have['num_classes']} classes), "
        f"not {want['model']} (width {want['width']:g}, {want['num_classes']} classes); "
        "use the same --model/--width/--data to resume it, or another --name",
    )
    return old


def provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """Git SHA (when effray runs from a checkout), library versions, the data checksum."""
    import ray
    import torch

    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "git_sha": sha,
        "torch": str(torch.__version__),
        "ray": str(ray.__version__),
        "data_checksum": meta.get("source_checksum", ""),
    }


def starting_model(cfg: TrainConfig, meta: dict[str, Any], run_dir: Path | None) -> tuple[TrainConfig, dict | None]:
    """Build the model here, before any worker starts, so a bad reference or weights file
    fails in one line; ``--pretrained`` weights are fetched once, here, and the workers load
    them from the run's directory. Returns the config the workers get and the load report."""
    model = build_model(cfg.model, int(meta["num_classes"]), int(meta["image_shape"][2]), cfg.width)
    if not (cfg.weights or cfg.pretrained):
        return cfg, None
    report = initial_weights(model, cfg.weights, cfg.model if cfg.pretrained else "")
    say(f"[effray] {describe(report, report['source'])}")
    if cfg.pretrained and run_dir is not None:
        path = run_dir / "pretrained.pt"
        write_file(path, lambda tmp: torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))
        cfg = dataclasses.replace(cfg, weights=str(path), pretrained=False)  # provenance's init says whence
    return cfg, report


def _count_lines(path: Path | None) -> int:
    return sum(1 for _ in path.open()) if path is not None and path.is_file() else 0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) one run on the current Ray cluster; returns the final metrics,
    the checkpoint path and where the run lives."""
    import ray

    meta = validate_data_dir(cfg.data.data)
    require(
        "val" in meta["splits"] and meta["counts"].get("val", 0) > 0,
        f"dataset {cfg.data.data} has no validation split; re-prepare it with --val-fraction > 0",
    )
    total, nodes = ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cfg = fit_cpus_per_worker(cfg, total, nodes)
    check_resources(cfg, total, nodes)
    # a URI (s3://, gs://) goes to Ray as is; the run-dir extras (run file, epoch log) are local-only
    local = "://" not in cfg.storage
    storage = os.path.abspath(os.path.expanduser(cfg.storage)) if local else cfg.storage.rstrip("/")
    require(local or cfg.inject_failure_at_epoch == -1, "--inject-failure-at-epoch needs a local --storage")
    cfg = dataclasses.replace(cfg, storage=storage, name=cfg.name or default_run_name(cfg))
    check_storage_for_cluster(storage)  # multi-node checkpointing needs storage every node sees
    run_dir = Path(storage) / cfg.name if local else None
    if run_dir is not None:
        check_existing_run(run_dir, cfg, meta)
    rows_per_rank = train_rows(cfg.data, meta) // cfg.data_parallel  # per data-parallel replica
    require(
        rows_per_rank >= 1,
        f"{train_rows(cfg.data, meta)} training rows can't feed {cfg.workers} workers; use fewer --workers",
    )
    strategy = STRATEGIES.get(cfg.parallel)
    run_id = stable_run_id(storage, cfg.name)
    mode = decide_wandb_mode(cfg.wandb_mode, {}, disabled=not cfg.wandb)
    cfg = dataclasses.replace(cfg, wandb_mode=mode)
    cfg, start = starting_model(cfg, meta, run_dir)
    prov = {**provenance(meta), **({"init": start} if start else {})}
    data = data_summary(meta, input_spec(meta["image_shape"], cfg.data.augment, meta["num_classes"], cfg.preprocess))
    tracker = (
        None
        if mode == "disabled"
        else TrackerSettings(
            project=cfg.wandb_project,
            name=cfg.name,
            run_id=run_id,
            mode=mode,
            dir=str(run_dir) if run_dir else "",
            config={
                **to_dict(cfg),
                "provenance": prov,
                "data_summary": {k: data[k] for k in ("checksum", "source", "classes")},
            },
        )
    )
    if run_dir is not None and not (run_dir / RUN_FILE).is_file():
        write_json(
            run_dir / RUN_FILE, {"config": to_dict(cfg), "data": data, "provenance": prov, "created": time.time()}
        )
    history = run_dir / HISTORY_FILE if run_dir else None
    epochs_before = _count_lines(history)
    done = finished_run(str(run_dir) if run_dir else f"{storage}/{cfg.name}", cfg.epochs)
    if done is not None:  # a re-run of a finished run: its result, without starting a worker
        metrics, checkpoint = done
        say(
            f"[effray] run {cfg.name!r} already trained {metrics['epoch']} epochs (--epochs {cfg.epochs}); "
            f"nothing to train: its checkpoint is {checkpoint}"
        )
        return _summary(cfg, run_dir, storage, checkpoint, 0 if history else None, metrics, mode, run_id, tracker)

    clock = f"effray-clock-{run_id}"
    # a split that fits the object store is cached there and reshuffled exactly every
    # epoch (effray.data.shuffle); a bigger one streams through Ray Train's split
    source = cache_split(cfg.data, num_cpus=cfg.data_cpus)
    train_ds = None if source is not None else train_dataset(cfg.data, clock=clock, num_cpus=cfg.data_cpus)
    if source is not None:
        steps = steps_per_epoch(source.rows, cfg.batch_size, cfg.data_parallel)
    elif cfg.elastic:  # optimizer steps of the whole global batch, whatever the world size
        steps = math.ceil(train_rows(cfg.data, meta) / cfg.batch_size)
    else:
        steps = math.ceil(rows_per_rank / cfg.per_worker_batch)
    worker = TrainWorker(
        train=cfg,
        name=cfg.name,
        run_dir=str(run_dir) if run_dir else "",
        clock=clock,
        data=data,
        provenance=prov,
        steps_per_epoch=steps,
        tracker=tracker,
        train_source=source,
        factories=provided(),
        progress=f"effray-steps-{run_id}",
    )
    trainer = torch_trainer(
        train_loop_per_worker,
        {"worker": to_dict(worker)},
        workers=(cfg.workers, cfg.max_workers) if cfg.elastic else cfg.workers,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.gpus_per_worker,
        name=cfg.name,
        storage=storage,
        max_failures=cfg.max_failures,
        keep_checkpoints=cfg.keep_checkpoints,
        datasets={
            **({"train": train_ds} if train_ds is not None else {}),
            # decoded once here: every rank reads the whole split each epoch (see validate)
            "val": eval_dataset(cfg.data.data, "val", num_cpus=cfg.data_cpus).materialize(),
        },
        dataset_config=strategy.dataset_config(cfg, train_ds),
        extra_resources=parse_resources(cfg.worker_resources),
        grow_check_s=cfg.grow_check_s,
    )
    # elastic: after a node dies Ray still counts its resources for a few seconds, and a
    # worker group sized to them would wait Ray Train's 60 s before trying the size that fits
    with relayed_step_bars(worker.progress):  # rank 0's per-step bar, drawn on this terminal
        result = fit(
            trainer, clock, env={WORKER_START_TIMEOUT_ENV: f"{cfg.resize_timeout_s:g}"} if cfg.elastic else None
        )
    return _summary(
        cfg,
        run_dir,
        storage,
        result.checkpoint.path if result.checkpoint else None,
        _count_lines(history) - epochs_before if history else None,
        result.metrics or {},
        mode,
        run_id,
        tracker,
    )


def _summary(
    cfg: TrainConfig,
    run_dir: Path | None,
    storage: str,
    checkpoint: str | None,
    epochs_run_now: int | None,
    metrics: dict[str, Any],
    mode: str,
    run_id: str,
    tracker: TrackerSettings | None,
) -> dict[str, Any]:
    """The one JSON line `effray train` prints."""
    return {
        "run": cfg.name,
        "run_dir": str(run_dir) if run_dir else f"{storage}/{cfg.name}",
        "checkpoint": checkpoint,
        "epochs_run_now": epochs_run_now,
        **{k: metrics[k] for k in SUMMARY_KEYS if k in metrics},
        "wandb": {"mode": mode, "run_id": run_id, "dir": str(run_dir / "wandb") if run_dir else None}
        if tracker
        else None,
    }
