"""``effray tune``: Ray Tune over the compression space, from one teacher to measured trials.

Each trial compresses the teacher with one sampled :class:`CompressConfig`, reports
validation accuracy after every fine-tuning epoch (so ASHA can stop poor trials) with the
fine-tune so far as its checkpoint, and ends with one ``final`` report holding the full
measurement of the saved artifact, which it keeps as the trial's checkpoint. A trial
whose node dies is retried (``--max-failures``) from its last epoch's checkpoint, on any
node. The experiment resumes when the same command runs again with the same
``--storage``/``--name``: finished trials are kept, errored ones are retried.

A trial trains in its own process (``--workers-per-trial 1``) or, with more workers, runs
a ``TorchTrainer`` of :func:`effray.compress.run.compress_loop_per_worker` inside the Tune
function trainable (Ray 2.60 deprecates ``Tuner(trainer)``): a deterministic Ray Train run
per trial under the trial's directory, its rank-0 epoch reports forwarded to Tune by
``TuneReportCallback``, so on a GPU cluster each trial can be a multi-GPU run.

Tracking (wandb, offline without a key): every trial is a run (``job_type="trial"``) in
the experiment's group, with a stable id per storage/name/trial so a retried trial
resumes its run; at the end the summary (results table, Pareto plot, best rows) is its
own run (``job_type="summary"``). The mode is decided once, on the driver.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.atomic import write_json
from effray.compress.artifact import load_artifact
from effray.compress.config import CompressConfig
from effray.compress.cost import epoch_costs
from effray.compress.measure import accuracy, compare
from effray.compress.recipe import PROGRESS_FORMAT, compress_local
from effray.compress.run import (
    CompressRunConfig,
    eval_and_calib,
    fine_tune_on_workers,
    measure_artifact,
    teacher_baseline,
    xy_batches,
)
from effray.config import from_dict, merge, option, require, to_dict
from effray.data.arrays import epoch_batches, eval_batches, load_arrays, split_bytes
from effray.data.pipeline import DataConfig, kill_clock, torch_batches, train_dataset, validate_data_dir
from effray.data.prepare import load_meta
from effray.errors import EffrayError
from effray.evaluate.corrupt import parse_corruptions
from effray.evaluate.robustness import corruption_accuracy, parse_severities
from effray.search.aggregate import ReportConfig, report
from effray.search.scheduler import LastEpochSafeASHA, ParetoASHA
from effray.search.searcher import Budget, CostAwareSearch, CostModel, SpaceSampler, check_feasible
from effray.search.space import has_grid, load_space, to_param_space
from effray.tracking import TrackerSettings, decide_wandb_mode, make_tracker, stable_run_id
from effray.train.checkpoint import data_summary, load_checkpoint, read_payload, save_payload
from effray.train.config import WANDB_MODES

log = logging.getLogger(__name__)

SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("pareto", "asha", "none")
OBJECTIVES = ("bytes", "macs", "latency_ms")
METRIC = "val_accuracy"
DRIVER_CPUS = 0.01  # what a trial that drives a Ray Train run reserves for itself
STOPPED_FILE = "stopped.json"  # the pareto scheduler's record of the trials it stopped, and why


@dataclass(frozen=True)
class TuneConfig:
    """The search: what to compress, over which space, with how much of the cluster."""

    teacher: str = option("", "teacher checkpoint (a run directory or its model.pt)")
    data: str = option("", "prepared dataset directory (its val split scores every trial)")
    space: str = option("demo", "search space: a preset (demo, cifar10) or a YAML file of CompressConfig fields")
    num_samples: int = option(8, "trials to sample (with --search grid: repeats of the grid)")
    search: str = option("random", "search algorithm (optuna needs `pip install effray[optuna]`)", choices=SEARCHERS)
    multi_objective: bool = option(False, "optuna only: maximise accuracy and minimise bytes together")
    scheduler: str = option(
        "pareto",
        "early stopping: pareto (multi-objective successive halving: a trial stops only when dominated in accuracy "
        "and cost), asha (Ray's, on accuracy alone) or none",
        choices=SCHEDULERS,
    )
    objective: str = option(
        "bytes", "the cost the pareto scheduler weighs against accuracy (predicted before training)", choices=OBJECTIVES
    )
    grace_period: int = option(1, "epochs every trial runs before it can be stopped")
    reduction_factor: float = option(
        3.0, "successive halving: rungs every x this many epochs, about 1/x of a rung's trials go on"
    )
    acc_margin: float = option(
        0.005,
        "pareto: a trial is dominated only by one at least this much more accurate (noise margin) and no more costly",
    )
    max_size_kb: float = option(
        0.0, "drop configs whose predicted artifact exceeds this many KB before they run (0 = no limit)"
    )
    max_macs: float = option(0.0, "drop configs whose MACs per image exceed this before they run (0 = no limit)")
    max_latency_ms: float = option(
        0.0, "drop configs whose estimated batch-1 latency (teacher's, scaled by MACs) exceeds this (0 = no limit)"
    )
    share_data: bool = option(
        True,
        "decode the splits once on the driver and share them with every in-process trial through the object store; "
        "--no-share-data streams each trial's epochs through its own Ray Data pipeline",
    )
    max_concurrent: int = option(0, "trials at once (0 = what the cluster's CPUs/GPUs allow)")
    cpus_per_trial: float = option(
        1.0, "CPUs reserved per trial (with --workers-per-trial W: split evenly over its W workers)"
    )
    gpus_per_trial: float = option(
        0.0, "GPUs reserved per trial (with --workers-per-trial W: split evenly, a whole GPU per worker)"
    )
    workers_per_trial: int = option(
        1,
        "Ray Train workers per trial: 1 trains in the trial's own process, W > 1 runs a data-parallel TorchTrainer "
        "per trial",
    )
    data_cpus: float = option(
        1.0, "with --workers-per-trial > 1: logical CPUs per Ray Data decode/augment task of a trial"
    )
    augment: str = option("standard", "augmentation policy of the fine-tuning stream")
    eval_batch_size: int = option(256, "batch size for validation and calibration")
    robust_images: int = option(
        200,
        "val images every trial's final artifact is scored on under each corruption (mean corruption accuracy; 0 = "
        "off)",
    )
    robust_corruptions: str = option(
        "all", "corruptions of that score: 'all' or a comma-separated list (effray.data.corrupt)"
    )
    robust_severities: str = option(
        "1,3,5", "severities of that score (1-5); `effray evaluate --corruptions all` gives the full table"
    )
    seed: int = option(0, "seed of the search and of every trial's data stream")
    storage: str = option("runs/tune", "experiment storage path (shared or cloud storage on a multi-node cluster)")
    name: str = option("compress", "experiment name; re-running the same name resumes it")
    max_failures: int = option(1, "retries of a trial that errored")
    wandb_project: str = option("effray", "Weights & Biases project")
    wandb: bool = option(
        True,
        "log every trial and the summary to Weights & Biases (offline when no API key is set); --no-wandb turns it off",
    )
    wandb_mode: str = option(
        "auto", "wandb mode; auto = online with an API key, else offline (wandb sync later)", choices=WANDB_MODES
    )

    def validate(self) -> None:
        require(bool(self.teacher), "--teacher CKPT is required (a checkpoint from `effray train`)")
        require(bool(self.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(self.max_concurrent >= 0, f"--max-concurrent must be >= 0, got {self.max_concurrent}")
        require(
            self.cpus_per_trial > 0 and self.gpus_per_trial >= 0,
            "--cpus-per-trial must be > 0 and --gpus-per-trial >= 0",
        )
        require(not self.multi_objective or self.search == "optuna", "--multi-objective needs --search optuna")
        require(self.grace_period >= 1, f"--grace-period must be >= 1, got {self.grace_period}")
        require(self.reduction_factor > 1, f"--reduction-factor must be > 1, got {self.reduction_factor}")
        require(self.acc_margin >= 0, f"--acc-margin must be >= 0, got {self.acc_margin}")
        require(
            min(self.max_size_kb, self.max_macs, self.max_latency_ms) >= 0,
            "--max-size-kb, --max-macs and --max-latency-ms must be >= 0",
        )
        require(
            isinstance(self.workers_per_trial, int) and self.workers_per_trial >= 1,
            f"--workers-per-trial must be >= 1, got {self.workers_per_trial}",
        )
        require(self.data_cpus > 0, f"--data-cpus must be > 0, got {self.data_cpus}")
        require(self.robust_images >= 0, f"--robust-images must be >= 0, got {self.robust_images}")
        if self.robust_images:
            parse_corruptions(self.robust_corruptions)
            parse_severities(self.robust_severities)
        require(not self.wandb or bool(self.wandb_project), "--wandb-project is empty; name one or pass --no-wandb")

    @property
    def cpus_per_worker(self) -> float:
        return self.cpus_per_trial / self.workers_per_trial

    @property
    def gpus_per_worker(self) -> float:
        return self.gpus_per_trial / self.workers_per_trial


# ------------------------------------------------------------------ the trial


def compression_trial(config: dict[str, Any], shared: dict[str, Any] | None = None) -> None:
    """Tune's function trainable: one compression run, reported epoch by epoch, tracked as
    one wandb run that ends with the trial (exit code 1 when it fails). ``shared``: the
    driver's decoded splits (object refs), when the search shares them."""
    import ray
    import ray.tune

    started = time.perf_counter()
    ctx = config["context"]
    cfg = merge(from_dict(CompressConfig, ctx["base"]), config["compress"])
    trial = ray.tune.get_context().get_trial_id()
    tracker = make_tracker(_trial_tracking(ctx, trial, cfg))
    # known before training: what the scheduler ranks every epoch by, and the last epoch
    extra = {**{f"predicted_{k}": v for k, v in config.get("predicted", {}).items()}, "epochs": cfg.finetune_epochs}
    clock = {"started": started}

    def report_final(student: dict[str, Any], artifact_dir: str) -> None:
        final = {**_final_metrics(student, cfg.finetune_epochs), **extra}
        done = time.perf_counter()
        final.update(
            setup_s=clock.get("first_epoch", done) - started,
            trial_s=done - started,
            worker_start_s=_worker_start_s(started),
            finetune_s=clock.get("last_epoch", done) - clock.get("first_epoch", done),
        )
        tracker.log({k: v for k, v in final.items() if v is not None}, step=cfg.finetune_epochs + 1)
        tracker.set_summary({k: v for k, v in final.items() if v is not None})
        # where the trial ran (its Ray Train workers report their own nodes in their epochs)
        final["node"] = ray.get_runtime_context().get_node_id()
        ray.tune.report(final, checkpoint=ray.tune.Checkpoint.from_directory(artifact_dir))

    try:
        if ctx["workers_per_trial"] > 1:
            _trial_on_ray_train(ctx, cfg, trial, tracker, report_final, extra)
        else:
            _trial_in_process(ctx, cfg, trial, tracker, report_final, extra, shared, clock)
    except SystemExit:  # Tune stopped the trial (the scheduler): it ended as asked
        tracker.finish(exit_code=0)
        raise
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)


_served: set[int] = set()  # processes that already ran a trial (Tune reuses them)


def _worker_start_s(started: float) -> float:
    """Seconds from this process's start to the trial's first line (imports, the context
    fetched): paid by the first trial a worker process runs, 0 for the ones it runs next."""
    import psutil

    pid = os.getpid()
    if pid in _served:
        return 0.0
    _served.add(pid)
    return max(0.0, started - (time.perf_counter() - (time.time() - psutil.Process().create_time())))


def _final_metrics(student: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The trial's last report: the measured artifact (what `effray report` aggregates)."""
    return {
        METRIC: student["accuracy"],
        "accuracy": student["accuracy"],
        "bytes": student["bytes"],
        "macs": student["macs"],
        "latency_ms": student["latency_ms_b1"],
        "latency_ms_b256": student.get("latency_ms_b256"),
        "params": student["params"],
        "nonzero_params": student["nonzero_params"],
        "int8_latency_ms": student.get("int8_latency_ms_b1"),
        "int8_speedup_b256": student.get("int8_speedup_b256"),
        **{k: student.get(k) for k in ("macro_f1", "worst_class_recall", "ece", "nll", "corruption_accuracy")},
        **{f"ratio_{k}": v for k, v in student.get("vs_teacher", {}).items()},
        "epoch": epochs + 1,
        "final": True,
    }


def _trial_dir(ctx: dict[str, Any], trial: str) -> str:
    """The trial's directory in the experiment's storage (a path or a URI)."""
    return f"{ctx['experiment']}/trial_{trial}"


def _trial_tracking(ctx: dict[str, Any], trial: str, cfg: CompressConfig) -> TrackerSettings | None:
    t = ctx["tracking"]
    if t is None:
        return None
    local = "://" not in ctx["experiment"]
    return TrackerSettings(
        project=t["project"],
        name=f"{ctx['name']}-{trial}",
        mode=t["mode"],
        run_id=stable_run_id(ctx["storage"], f"{ctx['name']}/{trial}"),
        dir=_trial_dir(ctx, trial) if local else "",
        group=ctx["name"],
        job_type="trial",
        config={**to_dict(cfg), "trial_id": trial, "workers_per_trial": ctx["workers_per_trial"]},
    )


def _trial_in_process(
    ctx: dict[str, Any],
    cfg: CompressConfig,
    trial: str,
    tracker: Any,
    report_final: Callable[[dict[str, Any], str], None],
    extra: dict[str, Any],
    shared: dict[str, Any] | None,
    clock: dict[str, float],
) -> None:
    """One worker: the recipe of :func:`effray.compress.recipe.compress_local` in this
    process, its epochs drawn from the driver's shared arrays (or, without them, streamed
    by a Ray Data pipeline of its own)."""
    import ray.tune

    teacher, _ = load_checkpoint(ctx["teacher"])
    meta = load_meta(ctx["data"])
    device = trial_device()
    bs = cfg.finetune_batch_size
    train_batches, evals, calib, rows, done = _trial_data(ctx, cfg, trial, meta, device, shared)

    def on_epoch(epoch: int, model: Any, progress: Callable[[], dict[str, Any]]) -> None:
        """Report the epoch with the fine-tune so far as its checkpoint: a trial retried
        after its node died goes on from here (Tune hands it back through get_checkpoint)."""

        clock["last_epoch"] = time.perf_counter()
        acc, _ = accuracy(model, evals)
        tracker.log({METRIC: acc, "epoch": epoch + 1}, step=epoch + 1)
        # the rungs rank by the weights' own size once they are final
        costs = epoch_costs(
            extra, model, cfg, epoch, teacher.spec, teacher_info=ctx["teacher_info"], data=ctx["data_info"]
        )
        with tempfile.TemporaryDirectory() as keep:
            save_payload(keep, progress())
            ray.tune.report(
                {METRIC: acc, "epoch": epoch + 1, "final": False, "node": node, **costs},
                checkpoint=ray.tune.Checkpoint.from_directory(keep),
            )

    def timed_batches(epoch: int) -> Any:
        clock.setdefault("first_epoch", time.perf_counter())
        return train_batches(epoch)

    node, resume = ray.get_runtime_context().get_node_id(), _trial_progress()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = compress_local(
                teacher,
                cfg,
                timed_batches,
                calib,
                evals,
                tmp,
                teacher_info=ctx["teacher_info"],
                data=ctx["data_info"],
                teacher_metrics=ctx["teacher_metrics"],
                on_epoch=on_epoch,
                steps_per_epoch=max(1, -(-rows // bs)),
                log=lambda line: None,
                resume=resume,
                device=device,
            )
            val = ray.get(shared["val"]) if shared is not None else None
            report_final(_with_robustness(result["student"], tmp, ctx, val), tmp)
    finally:
        done()


def _trial_data(
    ctx: dict[str, Any],
    cfg: CompressConfig,
    trial: str,
    meta: dict[str, Any],
    device: Any,
    shared: dict[str, Any] | None,
) -> tuple[Callable[[int], Any], list, list, int, Callable[[], None]]:
    """``(train_batches(epoch), evals, calib, training rows, cleanup)`` of an in-process trial."""
    bs, ebs = cfg.finetune_batch_size, ctx["eval_batch_size"]
    if shared is not None:
        import ray

        train, val = ray.get(shared["train"]), ray.get(shared["val"])  # zero-copy views of the driver's arrays
        calib_rows = {k: v[: ebs * cfg.calib_batches] for k, v in train.items()}

        def from_arrays(epoch: int) -> Any:
            return epoch_batches(train, meta, bs, policy=ctx["augment"], seed=ctx["seed"], epoch=epoch, device=device)

        return (
            from_arrays,
            eval_batches(val, meta, ebs),
            eval_batches(calib_rows, meta, ebs),
            len(train["label"]),
            lambda: None,
        )

    data_cfg = DataConfig(data=ctx["data"], augment=ctx["augment"], seed=ctx["seed"])
    clock = f"tune-{ctx['name']}-{trial}"
    train_ds = train_dataset(data_cfg, clock=clock)

    def streamed(epoch: int) -> Any:
        return xy_batches(
            torch_batches(
                train_ds, meta, bs, clock=clock, epoch=epoch, shuffle_buffer=data_cfg.shuffle_buffer, seed=ctx["seed"]
            )
        )

    evals, _, calib = eval_and_calib(ctx["data"], meta, ebs, cfg.calib_batches)
    return streamed, evals, calib, meta["counts"]["train"], lambda: kill_clock(clock)


def _trial_progress() -> dict[str, Any] | None:
    """The fine-tune a retried trial goes on from: its last epoch's checkpoint, if Tune has one."""
    import ray.tune

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        payload = read_payload(d)
    if payload.get("format") != PROGRESS_FORMAT:  # its measured artifact: it had finished fine-tuning
        return None
    log.info("trial resumes its fine-tune after epoch %s", payload.get("epochs_done"))
    return payload


def trial_device() -> Any:
    """The GPU Tune gave this trial (``--gpus-per-trial`` > 0: Ray sets
    ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda:0`` here), else the CPU."""
    import ray
    import torch

    return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def _trial_on_ray_train(
    ctx: dict[str, Any],
    cfg: CompressConfig,
    trial: str,
    tracker: Any,
    report_final: Callable[[dict[str, Any], str], None],
    extra: dict[str, Any],
) -> None:
    """W workers: a TorchTrainer of :func:`compress_loop_per_worker` (the same fit as
    `effray compress`), named per trial so a retried trial finds its run; rank 0's epoch
    reports reach Tune through ``TuneReportCallback``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    meta = load_meta(ctx["data"])
    trial_dir = _trial_dir(ctx, trial)
    local = "://" not in trial_dir
    # rank 0 writes the artifact here: the experiment's storage (shared on a multi-node cluster)
    out = os.path.join(trial_dir, "artifact") if local else tempfile.mkdtemp(prefix="effray-trial-")
    rc = CompressRunConfig(
        compress=cfg,
        data=DataConfig(data=ctx["data"], augment=ctx["augment"], seed=ctx["seed"]),
        out=out,
        overwrite=True,
        workers=ctx["workers_per_trial"],
        cpus_per_worker=ctx["cpus_per_worker"],
        gpus_per_worker=ctx["gpus_per_worker"],
        data_cpus=ctx["data_cpus"],
        eval_batch_size=ctx["eval_batch_size"],
    )
    evals, calib_ds, calib = eval_and_calib(ctx["data"], meta, ctx["eval_batch_size"], cfg.calib_batches)
    try:
        finetune = fine_tune_on_workers(
            rc,
            meta,
            calib_ds,
            ctx["teacher_info"],
            name=f"{ctx['name']}-{trial}",
            storage=trial_dir,
            callbacks=[TuneReportCallback()],
            report_extra=extra,
        )
        for e in finetune["epochs"]:  # the workers' epochs, as Tune saw them
            tracker.log({k: e[k] for k in (METRIC, "train_loss", "epoch") if k in e}, step=e["epoch"])
        student, _ = measure_artifact(out, cfg, calib, evals, ctx["teacher_metrics"])
        report_final(_with_robustness(student, out, ctx, None), out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------ the driver


def _write_json(path: str, data: dict[str, Any]) -> None:
    if "://" not in path:  # cloud storage: the trials' own results carry the ratios
        write_json(Path(path), data)


def _teacher_context(cfg: TuneConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Load and measure the teacher once, on the driver, for every trial's ratios."""

    teacher, _ = load_checkpoint(cfg.teacher)
    spec = dict(teacher.spec)
    require(
        spec["num_classes"] == meta["num_classes"],
        f"teacher {cfg.teacher} predicts {spec['num_classes']} classes, {cfg.data} has {meta['num_classes']}; use "
        "the dataset it was trained on",
    )
    val = load_arrays(cfg.data, "val")
    metrics, info = teacher_baseline(teacher, cfg.teacher, eval_batches(val, meta, cfg.eval_batch_size))
    robust = _robust_settings(cfg)
    if robust is not None:  # the baseline of every trial's corruption column
        metrics["corruption_accuracy"] = _corruption_score(teacher, val, meta, robust)
    return {"teacher": info["path"], "teacher_metrics": metrics, "teacher_info": info, "robust": robust}


def _robust_settings(cfg: TuneConfig) -> dict[str, Any] | None:

    if not cfg.robust_images:
        return None
    return {
        "names": parse_corruptions(cfg.robust_corruptions),
        "severities": parse_severities(cfg.robust_severities),
        "images": cfg.robust_images,
        "seed": cfg.seed,
    }


def _corruption_score(model: Any, val: dict[str, Any], meta: dict[str, Any], robust: dict[str, Any]) -> float:

    return corruption_accuracy(
        model, val, meta, robust["names"], robust["severities"], seed=robust["seed"], images=robust["images"]
    )


def _with_robustness(
    student: dict[str, Any], artifact_dir: str, ctx: dict[str, Any], val: dict[str, Any] | None
) -> dict[str, Any]:
    """The final artifact's mean corruption accuracy, beside its other scores, and its
    drop vs the teacher's (the same corrupted images)."""

    robust = ctx.get("robust")
    if robust is None:
        return student
    if val is None:
        val = load_arrays(ctx["data"], "val", limit=robust["images"])
    model, _ = load_artifact(artifact_dir)
    student = {**student, "corruption_accuracy": _corruption_score(model, val, load_meta(ctx["data"]), robust)}
    return {**student, "vs_teacher": compare(student, ctx["teacher_metrics"])}


def _concurrency(cfg: TuneConfig, shared: bool) -> int:
    """Trials at once: what the cluster's CPUs and GPUs hold. Trials on shared arrays need
    nothing else; streaming trials leave one CPU for their Ray Data tasks."""
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    total = ray.cluster_resources()
    spare = 0 if shared else 1
    by_cpu = int(max(total.get("CPU", 1) - spare, 1) // cfg.cpus_per_trial)
    by_gpu = int(total.get("GPU", 0) // cfg.gpus_per_trial) if cfg.gpus_per_trial else by_cpu
    return max(1, min(by_cpu, by_gpu))


def _shares_data(cfg: TuneConfig, meta: dict[str, Any]) -> bool:
    """In-process trials share the decoded splits when they fit a quarter of the object store."""
    import ray

    if not cfg.share_data or cfg.workers_per_trial > 1:
        return False
    need = split_bytes(meta, "train") + split_bytes(meta, "val")
    fits = need <= 0.25 * ray.cluster_resources().get("object_store_memory", 0)
    if not fits:
        log.warning(
            "the decoded splits (%d MB) pass a quarter of the object store: every trial streams its own", need >> 20
        )
    return fits


def _shared_data(cfg: TuneConfig) -> dict[str, Any]:
    """The decoded train and val splits, once, in the object store (refs for the trials)."""
    import ray

    return {split: ray.put(load_arrays(cfg.data, split)) for split in ("train", "val")}


def check_trial_resources(cfg: TuneConfig, total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Fail in one line, before any trial starts, when one trial can never be placed
    (Tune and Ray Train would otherwise wait for the resources forever)."""
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    w = cfg.workers_per_trial
    if w == 1:
        require(
            cfg.cpus_per_trial <= cpus and cfg.gpus_per_trial <= gpus,
            f"a trial asks for {cfg.cpus_per_trial} CPU / {cfg.gpus_per_trial} GPU, the cluster has {cpus:g} / "
            f"{gpus:g}; lower --cpus-per-trial/--gpus-per-trial",
        )
        return
    cpw, gpw = cfg.cpus_per_worker, cfg.gpus_per_worker
    require(
        gpw == 0 or float(gpw).is_integer(),
        f"--workers-per-trial {w} splits --gpus-per-trial {cfg.gpus_per_trial:g} into {gpw:g} GPU per worker; "
        f"DDP on NCCL needs whole GPUs per worker: use --gpus-per-trial {w} (or 0 for CPUs)",
    )
    data = max(cfg.data_cpus, 1.0)  # Ray Data's file reads take a whole CPU whatever --data-cpus says
    need = cfg.cpus_per_trial + data + DRIVER_CPUS
    require(
        need <= cpus and cfg.gpus_per_trial <= gpus,
        f"--workers-per-trial {w} x {cpw:g} CPUs (--cpus-per-trial {cfg.cpus_per_trial:g}) + {data:g} for one "
        f"Ray Data task + {DRIVER_CPUS:g} for the trial needs {need:g} CPUs and {cfg.gpus_per_trial:g} GPUs, "
        f"the cluster has {cpus:g} / {gpus:g}; lower --cpus-per-trial/--gpus-per-trial",
    )
    if nodes:
        require(
            any(n.get("CPU", 0) >= cpw and n.get("GPU", 0) >= gpw for n in nodes),
            f"no node has {cpw:g} CPUs and {gpw:g} GPUs for one of a trial's {w} workers; "
            "lower --cpus-per-trial/--gpus-per-trial",
        )


def _searcher(cfg: TuneConfig, space: dict[str, Any], costs: Any) -> Any:
    """Effray's cost-aware searcher over the space: its own random/grid draws, or Optuna's."""

    budget = Budget(cfg.max_size_kb, cfg.max_macs, cfg.max_latency_ms)
    check_feasible(space, costs, budget, cfg.seed)
    if cfg.search != "optuna":
        return CostAwareSearch(
            costs, budget, sampler=SpaceSampler(space, cfg.seed, repeats=cfg.num_samples if cfg.search == "grid" else 1)
        )
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise EffrayError("--search optuna needs Optuna: pip install 'effray[optuna]' (or optuna)") from None
    domain = to_param_space(space)
    if cfg.multi_objective:
        inner = OptunaSearch(domain, metric=["accuracy", "bytes"], mode=["max", "min"], seed=cfg.seed)
    else:
        inner = OptunaSearch(domain, metric=METRIC, mode="max", seed=cfg.seed)
    return CostAwareSearch(
        costs, budget, inner=inner, constants={k: v for k, v in space.items() if not isinstance(v, dict)}
    )


def trial_count(cfg: TuneConfig, space: dict[str, Any] | None = None) -> int:
    """Trials Tune may start: ``--num-samples``, or with ``--search grid`` that many repeats
    of the grid (configs over budget are skipped, so there may be fewer)."""
    if cfg.search != "grid":
        return cfg.num_samples

    space = space if space is not None else load_space(cfg.space)
    return len(SpaceSampler(space, cfg.seed).points or [None]) * cfg.num_samples


def _scheduler(cfg: TuneConfig, path: str) -> Any:
    """Early stopping: effray's multi-objective rungs, Ray's ASHA on accuracy, or none."""
    from ray import tune

    if cfg.scheduler == "pareto":
        return ParetoASHA(
            metric=METRIC,
            costs=(f"predicted_{cfg.objective}",),
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            acc_margin=cfg.acc_margin,
            log_path=os.path.join(path, STOPPED_FILE) if "://" not in path else None,
        )
    if cfg.scheduler == "asha":
        return LastEpochSafeASHA(
            metric=METRIC,
            mode="max",
            time_attr="epoch",
            grace_period=cfg.grace_period,
            max_t=10_000,
            reduction_factor=cfg.reduction_factor,
        )
    return tune.schedulers.FIFOScheduler()


def _summary_run(cfg: TuneConfig, storage: str, path: str, mode: str, teacher: dict[str, Any]) -> dict[str, Any] | None:
    """The experiment's summary run: `effray report`'s table and Pareto plot (written to
    EXPERIMENT/report), in the trials' group. Never fails the search."""

    if "://" in path:
        return None  # the report reads a local experiment directory
    settings = TrackerSettings(
        project=cfg.wandb_project,
        name=f"{cfg.name}-summary",
        run_id=stable_run_id(storage, f"{cfg.name}/summary"),
        mode=mode,
        dir=path,
        group=cfg.name,
        job_type="summary",
        config={"tune": to_dict(cfg), "teacher": {k: v for k, v in teacher.items() if not isinstance(v, (dict, list))}},
    )
    try:
        summary = report(ReportConfig(experiment=path), tracking=settings)
    except Exception as exc:  # noqa: BLE001 - no finished trial yet, a plotting or wandb problem: the search stands
        log.warning("no wandb summary run for %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    return {"run_id": settings.run_id, "report": summary["report"]}


def tune_compression(cfg: TuneConfig, callbacks: list[Any] | None = None, stop: Any = None) -> dict[str, Any]:
    """Run (or resume) the search; returns the experiment path and a summary. ``callbacks``:
    Tune callbacks on the driver (``effray run``'s progress bar); ``stop``: a Tune stopper
    (the search benchmark's compute budget)."""
    import ray
    from ray import tune

    meta = validate_data_dir(cfg.data)
    space = load_space(cfg.space)
    require(
        cfg.search == "grid" or not has_grid(space),
        "the space has grid entries; use --search grid (or choice instead of grid)",
    )
    check_trial_resources(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    w = cfg.workers_per_trial
    require(
        w == 1 or meta["counts"]["train"] >= w,
        f"{meta['counts']['train']} training rows can't feed {w} workers per trial",
    )
    mode = decide_wandb_mode(cfg.wandb_mode, {}, disabled=not cfg.wandb)  # the CLI decides from its env first
    storage = os.path.abspath(cfg.storage) if "://" not in cfg.storage else cfg.storage.rstrip("/")
    path = f"{storage}/{cfg.name}" if "://" in storage else os.path.join(storage, cfg.name)
    teacher = _teacher_context(cfg, meta)
    context = {
        **teacher,
        "data": os.path.abspath(cfg.data),
        "augment": cfg.augment,
        "seed": cfg.seed,
        "eval_batch_size": cfg.eval_batch_size,
        "name": cfg.name,
        "base": to_dict(CompressConfig(teacher=teacher["teacher"])),
        "data_info": data_summary(meta),
        "storage": storage,
        "experiment": path,
        "workers_per_trial": w,
        "cpus_per_worker": cfg.cpus_per_worker,
        "gpus_per_worker": cfg.gpus_per_worker,
        "data_cpus": cfg.data_cpus,
        "tracking": None if mode == "disabled" else {"project": cfg.wandb_project, "mode": mode},
    }
    shares = _shares_data(cfg, meta)
    # W > 1: the trial only drives its Ray Train run, whose workers reserve the CPUs/GPUs
    # (Tune can't place a trial that asks for nothing: a token share of a CPU)
    trial_resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial} if w == 1 else {"cpu": DRIVER_CPUS}
    shared = _shared_data(cfg) if shares else None
    trainable = tune.with_resources(tune.with_parameters(compression_trial, shared=shared), trial_resources)
    param_space = {"context": context}  # the space itself is the searcher's (with its predicted costs)
    callbacks = list(callbacks or [])
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space)
        resumed = True
    else:
        costs = CostModel(
            teacher["teacher"],
            context["base"],
            context["teacher_metrics"],
            teacher["teacher_info"],
            context["data_info"],
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=trial_count(cfg, space),
                search_alg=_searcher(cfg, space, costs),
                scheduler=_scheduler(cfg, path),
                max_concurrent_trials=_concurrency(cfg, shares),
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
                reuse_actors=w == 1,  # a trial's process (torch imported, kernels warm) serves the next trial
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=storage,
                callbacks=callbacks,
                stop=stop,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
            ),
        )
        resumed = False
    _write_json(f"{path}/teacher.json", context["teacher_metrics"])
    grid = tuner.fit()
    finished = sum(1 for r in grid if r.error is None)
    measured = sum(1 for r in grid if r.error is None and (r.metrics or {}).get("final"))
    summary = {
        "experiment": path,
        "trials": len(grid),
        "finished": finished,
        "measured": measured,
        "stopped_early": finished - measured,
        "errored": len(grid) - finished,
        "resumed": resumed,
        "workers_per_trial": w,
        "shared_data": shares,
        "teacher": context["teacher_metrics"],
    }
    if mode != "disabled":
        run = _summary_run(cfg, storage, path, mode, context["teacher_metrics"])
        summary["wandb"] = {
            "mode": mode,
            "project": cfg.wandb_project,
            "group": cfg.name,
            "summary_run_id": run["run_id"] if run else None,
        }
        if run:
            summary["report"] = run["report"]
    return summary
