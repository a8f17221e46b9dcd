"""``effray compress``: one teacher -> one measured artifact, fine-tuned on Ray Train.

Two levels, as in :mod:`effray.train.run` / :mod:`effray.train.loop`:

* :func:`compress` (the driver) checks every user input before any worker starts (bad
  rates or bits, a teacher that doesn't load, a student or dataset with other classes,
  an existing ``--out``), measures the teacher, fits a ``TorchTrainer`` running
  :func:`compress_loop_per_worker`, then loads the artifact the workers wrote, builds its
  int8 runtime, measures the *file* and writes ``OUT/metrics.json`` atomically.
* :func:`compress_loop_per_worker` is :func:`effray.compress.recipe.compress_local` step
  for step, data-parallel: the same free functions, DDP through the training Strategy
  (re-prepared whenever pruning or quantization replaces parameters), every rank
  calibrating on the same rows, exact all-reduced validation after every epoch, and rank 0
  writing the artifact to a temp dir that is renamed into ``OUT``.

``OUT`` must be visible from the node of rank 0 (one node, or a shared filesystem: checked
on a multi-node cluster); the fine-tuning epochs reach the driver through a mailbox actor
the driver owns (:func:`effray.train.run.open_mailbox`), never a file on rank 0's node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.atomic import replace_dir, write_json
from effray.compress.artifact import file_checksum, load_artifact, save_artifact
from effray.compress.config import CompressConfig
from effray.compress.cost import epoch_costs
from effray.compress.distill import freeze_teacher
from effray.compress.int8 import to_int8
from effray.compress.measure import measure
from effray.compress.prune import lock_sparsity, prune_step, weight_sparsity
from effray.compress.recipe import (
    apply_quantization,
    build_student,
    cosine_lr,
    epoch_optimizer,
    finish,
    method_summary,
    progress_payload,
    prune_events,
    pruned_before,
    quant_epoch,
    resume_student,
    train_step,
)
from effray.config import from_dict, option, require, require_whole_gpus, to_dict, validated
from effray.data.pipeline import (
    DataConfig,
    eval_dataset,
    sample_images,
    torch_batches,
    train_dataset,
    validate_data_dir,
)
from effray.data.shuffle import cache_split, steps_per_epoch, training_batches
from effray.storage import check_storage_for_cluster
from effray.train.checkpoint import checkpoint_file, data_summary, load_checkpoint, read_payload, save_payload
from effray.train.loop import DATA_INIT_IMAGES, all_sum, die_once, say, seed_epoch, validate, worker_nodes
from effray.train.parallel import STRATEGIES, make_strategy, prepare_model
from effray.train.run import check_resources, fit, open_mailbox, post, provenance, torch_trainer, train_rows
from effray.train.strategy import unwrap

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class CompressRunConfig:
    """What to compress (``CompressConfig``), on which data, into which directory, on how
    many Ray Train workers."""

    compress: CompressConfig = CompressConfig()
    data: DataConfig = DataConfig()
    out: str = option("", "output directory: the artifact (model.pt) and metrics.json")
    overwrite: bool = option(False, "replace an existing --out")
    workers: int = option(2, "data-parallel fine-tuning workers (Ray Train workers)")
    cpus_per_worker: float = option(1.0, "logical CPUs reserved per worker (torch threads = max(1, floor(this)))")
    gpus_per_worker: float = option(0.0, "GPUs per worker; > 0 fine-tunes on GPUs with NCCL, 0 on CPUs with gloo")
    data_cpus: float = option(1.0, "logical CPUs per Ray Data decode/augment task")
    eval_batch_size: int = option(256, "batch size for validation and calibration")
    max_failures: int = option(
        2, "fine-tuning restarts after a worker or node dies, each from the last epoch's checkpoint (-1 = forever)"
    )
    inject_failure_at_epoch: int = option(
        -1,
        "for testing fault tolerance: worker rank 1 (0 if alone) dies once during this fine-tuning epoch (1-based; "
        "-1 = never)",
    )

    def validate(self) -> None:
        require(bool(self.compress.teacher), "--teacher CKPT is required (a checkpoint from `effray train`)")
        require(bool(self.data.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(bool(self.out), "--out DIR is required")
        require(isinstance(self.workers, int) and self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        require(
            self.cpus_per_worker > 0 and self.gpus_per_worker >= 0 and self.data_cpus > 0,
            "--cpus-per-worker and --data-cpus must be > 0, --gpus-per-worker >= 0",
        )
        require(self.eval_batch_size > 0, f"--eval-batch-size must be > 0, got {self.eval_batch_size}")
        require(self.max_failures >= -1, f"--max-failures must be >= -1, got {self.max_failures}")
        require(
            self.inject_failure_at_epoch == -1 or 1 <= self.inject_failure_at_epoch <= self.compress.finetune_epochs,
            f"--inject-failure-at-epoch must be -1 or 1..{self.compress.finetune_epochs} (--finetune-epochs)",
        )
        require_whole_gpus(self.workers, self.gpus_per_worker)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


# ------------------------------------------------------------------ the worker


def _rows(shard: Any, meta: dict[str, Any], batch: int) -> list[tuple[Any, Any]]:
    """A small unsplit dataset as (x, y) batches in row order (sorted by ``index``), so
    every rank sees exactly the same batches whatever order the blocks arrive in."""
    import torch

    parts = list(torch_batches(shard, meta, batch))
    if not parts:
        return []
    index = torch.cat([b["index"] for b in parts])
    order = torch.argsort(index)
    x = torch.cat([b["image"] for b in parts])[order]
    y = torch.cat([b["label"] for b in parts])[order]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


def compress_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the recipe of :func:`compress_local`, under DDP.
    ``config`` = {"run": to_dict(CompressRunConfig), "ctx": what the driver resolved}."""
    import ray.train
    import ray.train.torch
    import torch

    rc = from_dict(CompressRunConfig, config["run"])
    cfg, ctx = rc.compress, config["ctx"]
    meta, num_classes = ctx["meta"], int(ctx["meta"]["num_classes"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(rc.cpus_per_worker)))
    torch.manual_seed(rc.data.seed)  # the same student init on every rank (DDP broadcasts rank 0's anyway)
    strategy = make_strategy("ddp", device, channels_last=False, compile=False, amp=False)

    teacher, _ = load_checkpoint(ctx["teacher"])
    teacher = freeze_teacher(teacher).to(device)
    mean, std = ctx["data"]["mean"], ctx["data"]["std"]
    checkpoint = ray.train.get_checkpoint()  # a restart (dead worker or node) goes on after its last epoch
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress = read_payload(d)
        plain, start, step, optimizer_state = resume_student(progress, cfg, device)
        history: list[dict[str, Any]] = list(progress.get("history", []))
        if rank == 0:
            say(f"[effray] resuming the fine-tune after epoch {start}")
    else:
        plain = build_student(teacher, cfg, images=lambda: sample_images(rc.data.data, DATA_INIT_IMAGES, mean, std)).to(
            device
        )
        start, step, optimizer_state, history = 0, 0, None, []
    calib = [
        (x.to(device), y.to(device)) for x, y in _rows(ray.train.get_dataset_shard("calib"), meta, rc.eval_batch_size)
    ]
    source = ctx.get("train_source")  # the cached split, reshuffled exactly every epoch; None: streamed
    train_shard = None if source is not None else ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker = max(1, cfg.finetune_batch_size // world)
    events, qstart = prune_events(cfg), quant_epoch(cfg)
    epochs, steps = cfg.finetune_epochs, int(ctx["steps_per_epoch"])
    total, lock = epochs * steps, None
    model = prepare_model(plain, strategy)
    nodes = worker_nodes()

    def relock() -> Any:
        return lock_sparsity(plain) if cfg.prunes and cfg.prune_kind == "unstructured" else None

    for epoch in range(start, max(epochs, 1)):
        changed = False
        if epoch in events or epoch == qstart:
            strategy.sync_for_eval(model)  # rank 0's BN statistics everywhere: folding and scores agree
            if lock is not None:
                lock.release()
                lock = None
        if epoch in events:
            prune_step(plain, events[epoch], cfg.prune_kind, cfg.prune_importance, batches=calib)
            if rank == 0:
                say(
                    f"[effray] epoch {epoch}: pruned to {events[epoch]:.3f} ({cfg.prune_kind}); "
                    f"weight sparsity {weight_sparsity(plain):.3f}"
                )
            changed = True
        if epoch == qstart:
            apply_quantization(plain, cfg, calib)
            if rank == 0:
                say(f"[effray] epoch {epoch}: quantized ({cfg.quant_mode}, {cfg.bits} bits, act {cfg.act_bits})")
            changed = True
        if changed or (epoch == start and pruned_before(cfg, start)):
            lock = relock()
        if changed:
            plain = plain.to(device)
            model = prepare_model(plain, strategy)  # new parameters: a new DDP wrapper (and buckets)
        if changed or epoch == start:
            optimizer = epoch_optimizer(plain, cfg, step, total, None if changed else optimizer_state)
            optimizer_state = None
        if epochs == 0:
            break
        seed_epoch(rc.data.seed, epoch, rank)
        model.train()
        sums = torch.zeros(2, dtype=torch.float64, device=strategy.reduce_device)  # read once, after the epoch
        batches = training_batches(
            source,
            train_shard,
            meta,
            per_worker,
            epoch=epoch,
            replica=rank,
            replicas=world,
            clock=ctx["clock"],
            shuffle_buffer=rc.data.shuffle_buffer,
            seed=rc.data.seed,
        )
        for b in batches:
            for g in optimizer.param_groups:
                g["lr"] = cosine_lr(step, total, cfg.finetune_lr)
            x, y = b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True)
            sums[0] += train_step(model, teacher, x, y, optimizer, cfg).double() * len(y)
            sums[1] += len(y)
            step += 1
            if epoch + 1 == rc.inject_failure_at_epoch and rank == min(1, world - 1) and ctx.get("run_dir"):
                die_once(Path(ctx["run_dir"]))
        sums = all_sum(sums).cpu()
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(sums[0] / max(sums[1], 1)),
            "lr": optimizer.param_groups[0]["lr"],
            **ctx.get("report_extra", {}),
        }
        metrics.update(validate(strategy, model, val_shard, meta, rc.eval_batch_size, rank, world, num_classes))
        if rank == 0:
            say(
                f"[effray] epoch {epoch + 1}/{epochs}  loss {metrics['train_loss']:.4f}  val_acc "
                f"{metrics['val_accuracy']:.4f}"
            )
            # under a search: the size of rank 0's weights once final, what the scheduler ranks by
            metrics.update(
                epoch_costs(
                    ctx.get("report_extra", {}),
                    unwrap(model),
                    cfg,
                    epoch,
                    teacher.spec,
                    teacher_info=ctx["teacher_info"],
                    data=ctx["data"],
                )
            )
        history.append({k: v for k, v in metrics.items() if not isinstance(v, list)})
        if rank != 0:
            ray.train.report(history[-1])
            continue
        with tempfile.TemporaryDirectory() as keep:  # rank 0's fine-tune so far: what a restart resumes
            save_payload(
                keep,
                progress_payload(
                    plain, optimizer, cfg, epochs_done=epoch + 1, step=step, lock=lock, device=device, history=history
                ),
            )
            ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(keep))

    strategy.sync_for_eval(model)
    model = finish(unwrap(model), cfg, calib, lock)  # every rank: PTQ (if any) is deterministic, calib is shared
    final = validate(strategy, model, val_shard, meta, rc.eval_batch_size, rank, world, num_classes)
    if rank == 0:
        out = Path(rc.out)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:6]}"
        save_artifact(
            tmp,
            model.cpu(),
            method=method_summary(model, cfg, teacher.spec),
            config=to_dict(cfg),
            teacher=ctx["teacher_info"],
            data=ctx["data"],
            codec=cfg.codec,
        )
        replace_dir(tmp, out)
        # the epochs as the workers saw them, for the driver's metrics.json: through an actor
        # the driver owns, not a file on rank 0's node (another node's driver can't see it)
        post(ctx["mailbox"], {"epochs": history, "final": final, "world": world, "nodes": nodes, "resumed_from": start})
    # not "final": under Tune (TuneReportCallback) that key marks the measured artifact's report.
    # The accuracy under its own name too: Tune requires every report to carry the metric
    ray.train.report(
        {
            "epoch": epochs + 1,
            "finetuned": True,
            "world": world,
            "nodes": nodes,
            **ctx.get("report_extra", {}),
            "val_accuracy": final["val_accuracy"],
            **{f"final_{k}": v for k, v in final.items() if not isinstance(v, list)},
        }
    )


# ------------------------------------------------------------------ the driver


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

    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(tmp, teacher)
        metrics = measure(teacher, evals, artifact=tmp)
    info = {
        "checksum": file_checksum(checkpoint_file(teacher_path)),
        "spec": dict(teacher.spec),
        "path": str(Path(teacher_path).resolve()),
    }
    return metrics, info


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
    teacher, payload = load_checkpoint(rc.compress.teacher)
    spec = dict(getattr(teacher, "spec", {}) or payload.get("model_spec", {}))
    require(
        int(spec.get("num_classes", -1)) == int(meta["num_classes"]),
        f"teacher {rc.compress.teacher} predicts {spec.get('num_classes')} classes, {rc.data.data} has "
        f"{meta['num_classes']}; use the dataset it was trained on",
    )
    teacher.spec = spec
    build_student(teacher, rc.compress)  # a student with other classes/inputs fails here, in one line
    return teacher, payload, meta


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
) -> dict[str, Any]:
    """Fit the ``TorchTrainer`` running :func:`compress_loop_per_worker` on ``rc.workers``
    workers; rank 0 writes the artifact to ``rc.out`` (absolute). ``name``/``storage`` are
    Ray Train's run (deterministic names restore, from the last epoch's checkpoint);
    ``callbacks`` e.g. Tune's ``TuneReportCallback`` (``report_extra`` joins every epoch's
    report: a Tune trial's predicted costs); ``max_failures`` restarts after a dead
    worker or node, each from that checkpoint. Returns the epochs as the workers saw them
    (``{"epochs", "final", "world"}``)."""
    import ray

    rows, per_worker = worker_batches(rc, meta)
    run_id = uuid.uuid4().hex[:8]
    clock, box = f"effray-compress-clock-{run_id}", f"effray-compress-results-{run_id}"
    mailbox = open_mailbox(box)
    ctx = {
        "teacher": str(Path(rc.compress.teacher).resolve()),
        "teacher_info": teacher_info,
        "mailbox": box,
        "run_dir": os.path.join(storage, name) if "://" not in storage else "",
        "data": data_summary(meta),
        "meta": meta,
        "clock": clock,
        "steps_per_epoch": math.ceil(rows / per_worker),
        "report_extra": dict(report_extra or {}),
    }
    out = Path(rc.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # as `effray train`: a split that fits the object store is reshuffled exactly every epoch
    source = cache_split(rc.data, num_cpus=rc.data_cpus)
    train_ds = None if source is not None else train_dataset(rc.data, clock=clock, num_cpus=rc.data_cpus)
    if source is not None:
        ctx.update(
            train_source=source, steps_per_epoch=steps_per_epoch(source.rows, per_worker * rc.workers, rc.workers)
        )
    trainer = torch_trainer(
        compress_loop_per_worker,
        {"run": to_dict(rc), "ctx": ctx},
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
    fit(trainer, clock)
    finetune = ray.get(mailbox.get.remote())
    require(finetune is not None, f"the fine-tuning run {name} ended without its results")
    return finetune


def measure_artifact(
    out: str | Path, cfg: CompressConfig, calib: list, evals: list, teacher_metrics: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The artifact in ``out`` loaded and measured (the file, not the in-memory model), with
    its int8 runtime when ``cfg.int8``: ``(metrics, payload)``."""

    loaded, payload = load_artifact(out)
    int8 = to_int8(loaded, calib, max_batches=cfg.calib_batches) if cfg.int8 else None
    return measure(loaded, evals, artifact=out, int8_model=int8, teacher=teacher_metrics), payload


def compress(rc: CompressRunConfig) -> dict[str, Any]:
    """Compress ``--teacher`` into ``--out`` on the current Ray cluster; returns the summary
    printed by the CLI (``OUT/metrics.json`` holds the full measurement)."""
    import ray

    teacher, _, meta = check_inputs(rc)
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
        )
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    student, payload = measure_artifact(out, cfg, calib, evals, teacher_metrics)
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
        "workers": rc.workers,
    }
