"""`effray compress` on a Ray Train worker: the compression hooks on the one loop, under DDP.

:func:`compress_loop_per_worker` rebuilds what the driver handed over (:class:`CompressWorker`),
loads the frozen teacher, resumes the fine-tune from the run's newest readable checkpoint or
builds the student, reads the calibration rows in row order (the same batches on every
rank), and runs :func:`effray.train.recipe.run_recipe` with
:class:`~effray.compress.recipe.CompressHooks`: the exact per-epoch shuffle (or the streamed
shard), DDP re-prepared after every pruning or quantization event, exact all-reduced
validation after every epoch. At the end every rank finishes the student (PTQ is
deterministic on shared rows) and scores it; rank 0 writes the artifact to a temp dir renamed
into ``OUT`` and leaves the epochs in the driver's mailbox.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effray.atomic import replace_dir
from effray.compress.config import CompressRunConfig
from effray.compress.cost import epoch_costs
from effray.compress.distill import freeze_teacher
from effray.compress.recipe import CompressHooks, ready, start_fine_tune
from effray.compress.steps import save_student
from effray.config import from_dict
from effray.console import relay_to, say
from effray.data.arrays import load_arrays
from effray.data.images import sample_images
from effray.data.pipeline import torch_batches
from effray.data.shuffle import CachedSplit
from effray.mailbox import post
from effray.models.reference import use_factories
from effray.train.checkpoint import load_checkpoint
from effray.train.faults import InjectedFailure
from effray.train.loop import DATA_INIT_IMAGES
from effray.train.parallel import make_strategy
from effray.train.recipe import Plan, Run, run_recipe
from effray.train.session import RaySession
from effray.train.validate import Batches, CorruptionScore, batches_accuracy, validate


@dataclass(frozen=True)
class CompressWorker:
    """What every worker of a compression fine-tune gets from the driver (as ``to_dict``,
    rebuilt with ``from_dict``): the run's config and what the driver resolved for it."""

    run: CompressRunConfig
    teacher: str  # the teacher checkpoint's absolute path
    mailbox: str  # the driver's mailbox actor (effray.mailbox.open_mailbox)
    teacher_info: dict[str, Any] = field(default_factory=dict)  # checksum, spec, path: into the artifact
    run_dir: str = ""  # Ray Train's run directory (the fault marker's home); "" on remote storage
    data: dict[str, Any] = field(default_factory=dict)  # effray.train.checkpoint.data_summary
    meta: dict[str, Any] = field(default_factory=dict)  # the dataset's meta.json
    clock: str = ""
    steps_per_epoch: int = 1
    report_extra: dict[str, Any] = field(default_factory=dict)  # joins every report (a trial's predicted costs)
    train_source: CachedSplit | None = None  # the cached split reshuffled exactly every epoch; None: streamed
    factories: dict[str, Any] = field(default_factory=dict)  # the Python API's model factories, by reference
    progress: str = ""  # the driver's step-bar relay actor (effray.console.relayed_step_bars); "": no bar
    corruption: CorruptionScore | None = None  # scored by rank 0 after every epoch (a search's --max-corruption-drop)


def calib_rows(shard: Any, meta: dict[str, Any], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A small unsplit dataset as (x, y) batches in row order (sorted by ``index``), so
    every rank sees exactly the same batches whatever order the blocks arrive in."""
    parts = list(torch_batches(shard, meta, batch))
    if not parts:
        return []
    index = torch.cat([b["index"] for b in parts])
    order = torch.argsort(index)
    x = torch.cat([b["image"] for b in parts])[order]
    y = torch.cat([b["label"] for b in parts])[order]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]


def corrupted_copies(worker: CompressWorker, rank: int) -> Batches | None:
    """The corrupted val copies rank 0 scores after every epoch (made once); None elsewhere."""
    if worker.corruption is None or not worker.corruption.every_epoch or rank != 0:
        return None
    return worker.corruption.copies(load_arrays(worker.run.data.data, "val", limit=worker.corruption.images))


def compress_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the recipe of :func:`effray.compress.recipe.compress_local`,
    data-parallel. ``config`` = {"worker": to_dict(CompressWorker)}."""
    import ray.train

    worker = from_dict(CompressWorker, config["worker"])
    rc, meta = worker.run, worker.meta
    cfg, num_classes = rc.compress, int(meta["num_classes"])
    session = RaySession()
    rank, world, device = session.rank, session.world, session.device
    torch.set_num_threads(max(1, int(rc.cpus_per_worker)))
    torch.manual_seed(rc.data.seed)  # the same student init on every rank (DDP broadcasts rank 0's anyway)
    strategy = make_strategy("ddp", device, channels_last=False, compile=False, amp=False)

    use_factories(worker.factories)
    teacher, _ = load_checkpoint(worker.teacher, trust_code=True)  # the driver loaded it first, as the user allowed
    teacher = freeze_teacher(teacher).to(device)
    mean, std = worker.data["mean"], worker.data["std"]
    run, step, state, resumed = start_fine_tune(
        session, strategy, teacher, cfg, images=lambda: sample_images(rc.data.data, DATA_INIT_IMAGES, mean, std)
    )
    if run.start and rank == 0:
        say(f"[effray] resuming the fine-tune after epoch {run.start}")
    calib = [(x.to(device), y.to(device)) for x, y in calib_rows(session.dataset("calib"), meta, rc.eval_batch_size)]
    epochs = session.epochs(
        worker.train_source,
        meta,
        max(1, cfg.finetune_batch_size // world),
        replica=rank,
        replicas=world,
        clock=worker.clock,
        shuffle_buffer=rc.data.shuffle_buffer,
        seed=rc.data.seed,
    )
    val = session.dataset("val")
    corrupted = corrupted_copies(worker, rank)

    def scored(model: Any) -> dict[str, Any]:
        out = validate(strategy, model, val, meta, rc.eval_batch_size, rank, world, num_classes)
        if corrupted is not None:  # rank 0's alone: no collective in it, and rank 0 reports
            out["val_corruption_accuracy"] = batches_accuracy(strategy.unwrap(model), corrupted, meta)
        return out

    def costs(model: Any, epoch: int) -> dict[str, Any]:
        return epoch_costs(
            worker.report_extra, model, cfg, epoch, teacher.spec, teacher_info=worker.teacher_info, data=worker.data
        )

    hooks = CompressHooks(
        cfg,
        teacher,
        calib,
        epochs,
        steps_per_epoch=worker.steps_per_epoch,
        step=step,
        say=lambda line: say(f"[effray] {line}"),
        validate=lambda run: scored(run.model),
        extra=worker.report_extra,
        epoch_extra=costs,
        resumed=resumed,
    )
    ready(run, hooks, state)
    plan = Plan(
        epochs=cfg.finetune_epochs,
        steps_per_epoch=worker.steps_per_epoch,
        seed=rc.data.seed,
        failure=InjectedFailure(rc.inject_failure_at_epoch, worker.run_dir),
        progress=relay_to(worker.progress) if worker.progress and rank == 0 else None,
    )
    run_recipe(run, plan, hooks)
    final = scored(hooks.student)
    if rank == 0:
        save(worker, run, hooks, final)
    # not "final": under Tune (TuneReportCallback) that key marks the measured artifact's report.
    # The accuracy under its own name too: Tune requires every report to carry the metric
    ray.train.report(
        {
            "epoch": cfg.finetune_epochs + 1,
            "finetuned": True,
            "world": world,
            "nodes": run.nodes,
            **worker.report_extra,
            "val_accuracy": final["val_accuracy"],
            **{f"final_{k}": v for k, v in final.items() if not isinstance(v, list)},
        }
    )


def save(worker: CompressWorker, run: Run, hooks: CompressHooks, final: dict[str, Any]) -> None:
    """Rank 0: the artifact into ``OUT`` (written beside it, then renamed over it), and the
    epochs as the workers saw them in the driver's mailbox, for its metrics.json (through an
    actor the driver owns, not a file on rank 0's node: another node's driver can't see it)."""
    out = Path(worker.run.out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:6]}"
    save_student(
        tmp, hooks.student, worker.run.compress, hooks.teacher.spec, teacher_info=worker.teacher_info, data=worker.data
    )
    replace_dir(tmp, out)
    finetune = {"epochs": run.history, "final": final, "world": run.session.world, "nodes": run.nodes}
    post(worker.mailbox, {**finetune, "resumed_from": run.start})
