"""Tune's function trainable: one compression trial, from the teacher to a measured artifact.

Each trial compresses the teacher with one sampled :class:`CompressConfig`, reports
validation accuracy and worst-class recall after every fine-tuning epoch (so the
scheduler can stop poor trials) with the fine-tune so far as its checkpoint, and ends
with one ``final`` report holding the full measurement of the saved artifact, which it
keeps as the trial's checkpoint. A trial whose node dies is retried from its last epoch's
checkpoint, on any node.

A trial trains in its own process (``--workers-per-trial 1``: the recipe of
:func:`effray.compress.recipe.compress_local`) or, with more workers, drives a
``TorchTrainer`` of the same fit as ``effray compress``
(:func:`effray.compress.run.fine_tune_on_workers`) from inside this function trainable,
since Ray deprecates handing Tune a trainer: a deterministic Ray Train run per trial
under the trial's directory, its rank-0 epoch reports forwarded to Tune by
``TuneReportCallback``, so on a GPU cluster each trial can be a multi-GPU run.

Every trial is one wandb run (``job_type="trial"``) in the experiment's group, with a
stable id per storage/name/trial so a retried trial resumes its run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effray.compress.artifact import load_artifact
from effray.compress.config import CompressConfig, CompressRunConfig
from effray.compress.cost import epoch_costs
from effray.compress.measure import compare, epoch_scores
from effray.compress.progress import PROGRESS_FORMAT
from effray.compress.recipe import compress_local, measure_artifact
from effray.compress.run import eval_and_calib, fine_tune_on_workers
from effray.config import to_dict
from effray.data.arrays import load_arrays
from effray.data.pipeline import DataConfig
from effray.models.reference import use_factories
from effray.search.config import METRIC
from effray.search.context import TrialContext
from effray.search.results import CALIBRATION
from effray.search.splits import SharedSplits, trial_data
from effray.tracking import Tracker, TrackerSettings, make_tracker, stable_run_id
from effray.train.checkpoint import load_checkpoint, read_payload, save_payload
from effray.train.validate import batches_accuracy

log = logging.getLogger(__name__)


def compression_trial(config: dict[str, Any], context: TrialContext, shared: SharedSplits | None = None) -> None:
    """Tune's function trainable: one compression run, reported epoch by epoch, tracked as
    one wandb run that ends with the trial (exit code 1 when it fails). ``config``: the
    searcher's suggestion (``compress``: the sampled fields, ``predicted``: their costs);
    ``context`` and ``shared`` (the driver's decoded splits, when the search shares them)
    come through ``tune.with_parameters``."""
    import ray.tune

    clock = TrialClock(started=time.perf_counter())
    use_factories(context.factories)
    cfg = context.compress_config(config["compress"])
    trial_id = ray.tune.get_context().get_trial_id()
    # known before training: what the scheduler ranks every epoch by, and the last epoch
    known = {**{f"predicted_{k}": v for k, v in config.get("predicted", {}).items()}, "epochs": cfg.finetune_epochs}
    trial = Trial(context, cfg, trial_id, make_tracker(trial_tracking(context, trial_id, cfg)), known, clock)
    try:
        if context.workers.count > 1:
            run_on_ray_train(trial)
        else:
            run_in_process(trial, shared)
    except SystemExit:  # Tune stopped the trial (the scheduler): it ended as asked
        trial.tracker.finish(exit_code=0)
        raise
    except BaseException:
        trial.tracker.finish(exit_code=1)
        raise
    trial.tracker.finish(exit_code=0)


def trial_tracking(ctx: TrialContext, trial_id: str, cfg: CompressConfig) -> TrackerSettings | None:
    """The trial's wandb run, its offline files in the trial's directory; None untracked."""
    if ctx.wandb_mode == "disabled":
        return None
    return TrackerSettings(
        project=ctx.wandb_project,
        name=ctx.run_name(trial_id),
        mode=ctx.wandb_mode,
        run_id=stable_run_id(ctx.storage, f"{ctx.name}/{trial_id}"),
        dir=ctx.trial_dir(trial_id) if ctx.local else "",
        group=ctx.name,
        job_type="trial",
        config={**to_dict(cfg), "trial_id": trial_id, "workers_per_trial": ctx.workers.count},
    )


@dataclass
class TrialClock:
    """When the trial started, fed its first batch and ended its last epoch, for the
    set-up and fine-tuning times of its final report (what the search benchmark weighs
    as a trial's fixed overhead)."""

    started: float
    first_epoch: float | None = None
    last_epoch: float | None = None

    def timings(self) -> dict[str, float]:
        done = time.perf_counter()
        first = done if self.first_epoch is None else self.first_epoch
        last = done if self.last_epoch is None else self.last_epoch
        return {
            "setup_s": first - self.started,
            "trial_s": done - self.started,
            "worker_start_s": _worker_start_s(self.started),
            "finetune_s": last - first,
        }


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


@dataclass(frozen=True)
class Trial:
    """One running trial: what both ways of running it share."""

    ctx: TrialContext
    cfg: CompressConfig
    id: str
    tracker: Tracker
    known: dict[str, Any]  # joins every epoch's report: the predicted costs, the number of epochs
    clock: TrialClock

    def report_final(self, student: dict[str, Any], artifact_dir: str) -> None:
        """The trial's last report: the measured artifact (what `effray report` aggregates),
        which becomes the trial's checkpoint."""
        import ray
        import ray.tune

        final = {**final_metrics(student, self.cfg.finetune_epochs), **self.known, **self.clock.timings()}
        measured = {k: v for k, v in final.items() if v is not None}
        self.tracker.log(measured, step=self.cfg.finetune_epochs + 1)
        self.tracker.set_summary(measured)
        # where the trial ran (its Ray Train workers report their own nodes in their epochs)
        final["node"] = ray.get_runtime_context().get_node_id()
        ray.tune.report(final, checkpoint=ray.tune.Checkpoint.from_directory(artifact_dir))


def final_metrics(student: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The measured artifact as the report's columns, one epoch past the last fine-tuning epoch.
    ``latency_ms`` (the latency front's cost) is the deployed file's batch-1 latency on its
    runtime when the search deploys (:func:`with_deploy`), else the eager module's."""
    deployed = student.get("deployed") or {}
    return {
        METRIC: student["accuracy"],
        "accuracy": student["accuracy"],
        "bytes": student["bytes"],
        "macs": student["macs"],
        "latency_ms": deployed.get("latency_ms_b1", student["latency_ms_b1"] if not deployed else float("nan")),
        "eager_latency_ms": student["latency_ms_b1"],
        "eager_latency_ms_b256": student.get("latency_ms_b256"),
        "params": student["params"],
        "nonzero_params": student["nonzero_params"],
        "int8_latency_ms": student.get("int8_latency_ms_b1"),
        "int8_speedup_b256": student.get("int8_speedup_b256"),
        **{k: student.get(k) for k in ("macro_f1", "worst_class_recall", "ece", "nll", "corruption_accuracy")},
        **{k: student.get(k) for k in CALIBRATION},  # T fitted on the val split it is scored on
        **{f"ratio_{k}": v for k, v in student.get("vs_teacher", {}).items()},
        **deployed,
        "epoch": epochs + 1,
        "final": True,
    }


def with_robustness(
    student: dict[str, Any], artifact_dir: str, ctx: TrialContext, val: dict[str, Any] | None
) -> dict[str, Any]:
    """The final artifact's mean corruption accuracy, beside its other scores, and its
    drop vs the teacher's (the same corrupted images). ``val``: the shared val arrays,
    else the first images read from disk."""
    if ctx.robust is None:
        return student
    if val is None:
        val = load_arrays(ctx.data, "val", limit=ctx.robust.images)
    model, _ = load_artifact(artifact_dir, trust_code=True)  # this trial's own, from the checked teacher
    student = {**student, "corruption_accuracy": ctx.robust.score(model, val, ctx.meta())}
    return {**student, "vs_teacher": compare(student, ctx.teacher.metrics)}


def with_deploy(student: dict[str, Any], artifact_dir: str, ctx: TrialContext) -> dict[str, Any]:
    """The final artifact exported to the search's runtime, checked and timed beside the
    teacher (:meth:`effray.search.deployed.DeployProbe.measure`), as ``deployed``."""
    if ctx.deploy is None:
        return student
    return {**student, "deployed": ctx.deploy.measure(artifact_dir, ctx.data)}


def epoch_latency(trial: Trial) -> Callable[[str], float | None] | None:
    """With ``--objective latency``, what :func:`effray.compress.cost.epoch_costs` times an
    epoch's artifact with: its export on the search's runtime, once. Latency follows the
    shapes and the bit widths, and those are final once the weights are, so later epochs
    reuse the figure (a file that fails its check leaves the MAC-based estimate)."""
    ctx = trial.ctx
    if ctx.deploy is None or ctx.objective != "latency":
        return None
    measured: dict[str, float | None] = {}

    def latency(artifact_dir: str) -> float | None:
        if "ms" not in measured:
            measured["ms"] = ctx.deploy.measure(artifact_dir, ctx.data).get("latency_ms_b1")
        return measured["ms"]

    return latency


def epoch_corruption(ctx: TrialContext, val: dict[str, Any] | None) -> Callable[[Any], dict[str, float]]:
    """What an epoch adds to its scores for ``--max-corruption-drop``: the model's mean
    corruption accuracy on the teacher's corrupted val images, as ``val_corruption_accuracy``
    (the scheduler's floor); nothing without that limit. ``val``: the shared val arrays,
    else the first images read from disk; the corrupted copies are made once."""
    robust = ctx.robust
    if robust is None or not robust.every_epoch:
        return lambda model: {}
    copies = robust.copies(val if val is not None else load_arrays(ctx.data, "val", limit=robust.images))
    meta = ctx.meta()
    return lambda model: {"val_corruption_accuracy": batches_accuracy(model, copies, meta)}


def trial_device() -> Any:
    """The GPU Tune gave this trial (``--gpus-per-trial`` > 0: Ray sets
    ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda:0`` here), else the CPU."""
    import ray
    import torch

    return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def run_in_process(trial: Trial, shared: SharedSplits | None) -> None:
    """One worker: the recipe of :func:`effray.compress.recipe.compress_local` in this
    process, its epochs drawn from the driver's shared arrays (or, without them, streamed
    by a Ray Data pipeline of its own)."""
    import ray
    import ray.tune

    ctx, cfg, clock = trial.ctx, trial.cfg, trial.clock
    teacher, _ = load_checkpoint(ctx.teacher.path, trust_code=True)  # the driver loaded it first, as allowed
    meta = ctx.meta()
    device = trial_device()
    data = trial_data(ctx, cfg, trial.id, meta, device, shared)
    node = ray.get_runtime_context().get_node_id()
    latency = epoch_latency(trial)
    corrupted = epoch_corruption(ctx, data.val)

    def on_epoch(epoch: int, model: Any, progress: Callable[[], dict[str, Any]]) -> None:
        """Report the epoch with the fine-tune so far as its checkpoint: a trial retried
        after its node died goes on from here (Tune hands it back through get_checkpoint)."""
        clock.last_epoch = time.perf_counter()
        scores = {**epoch_scores(model, data.evals), **corrupted(model)}  # what a Ray Train trial's epochs report too
        trial.tracker.log({METRIC: scores[METRIC], "epoch": epoch + 1}, step=epoch + 1)
        # the rungs rank by the weights' own size once they are final
        costs = epoch_costs(
            trial.known,
            model,
            cfg,
            epoch,
            teacher.spec,
            latency=latency,
            teacher_info=ctx.teacher.info,
            data=ctx.data_info,
        )
        with tempfile.TemporaryDirectory() as keep:
            save_payload(keep, progress())
            ray.tune.report(
                {**scores, "epoch": epoch + 1, "final": False, "node": node, **costs},
                checkpoint=ray.tune.Checkpoint.from_directory(keep),
            )

    def timed_batches(epoch: int) -> Any:
        if clock.first_epoch is None:
            clock.first_epoch = time.perf_counter()
        return data.train_batches(epoch)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = compress_local(
                teacher,
                cfg,
                timed_batches,
                data.calib,
                data.evals,
                tmp,
                teacher_info=ctx.teacher.info,
                data=ctx.data_info,
                teacher_metrics=ctx.teacher.metrics,
                on_epoch=on_epoch,
                steps_per_epoch=max(1, -(-data.rows // cfg.finetune_batch_size)),
                log=lambda line: None,
                resume=_trial_progress(),
                device=device,
            )
            student = with_deploy(with_robustness(result["student"], tmp, ctx, data.val), tmp, ctx)
            trial.report_final(student, tmp)
    finally:
        data.close()


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


def run_on_ray_train(trial: Trial) -> None:
    """W workers: a TorchTrainer of :func:`effray.compress.run.compress_loop_per_worker`
    (the same fit as `effray compress`), named per trial so a retried trial finds its run;
    rank 0's epoch reports reach Tune through ``TuneReportCallback``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx, cfg = trial.ctx, trial.cfg
    meta = ctx.meta()
    trial_dir = ctx.trial_dir(trial.id)
    # rank 0 writes the artifact here: the experiment's storage (shared on a multi-node cluster)
    out = os.path.join(trial_dir, "artifact") if ctx.local else tempfile.mkdtemp(prefix="effray-trial-")
    rc = CompressRunConfig(
        compress=cfg,
        data=DataConfig(data=ctx.data, augment=ctx.augment, seed=ctx.seed),
        out=out,
        overwrite=True,
        workers=ctx.workers.count,
        cpus_per_worker=ctx.workers.cpus_per_worker,
        gpus_per_worker=ctx.workers.gpus_per_worker,
        data_cpus=ctx.workers.data_cpus,
        eval_batch_size=ctx.eval_batch_size,
    )
    evals, calib_ds, calib = eval_and_calib(ctx.data, meta, ctx.eval_batch_size, cfg.calib_batches)
    try:
        finetune = fine_tune_on_workers(
            rc,
            meta,
            calib_ds,
            ctx.teacher.info,
            name=ctx.run_name(trial.id),
            storage=trial_dir,
            callbacks=[TuneReportCallback()],
            report_extra=trial.known,
            corruption=ctx.robust,
        )
        for e in finetune["epochs"]:  # the workers' epochs, as Tune saw them
            trial.tracker.log({k: e[k] for k in (METRIC, "train_loss", "epoch") if k in e}, step=e["epoch"])
        student, _ = measure_artifact(out, cfg, calib, evals, ctx.teacher.metrics)
        trial.report_final(with_deploy(with_robustness(student, out, ctx, None), out, ctx), out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
