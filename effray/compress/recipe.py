"""The compression recipe on the one training loop: teacher -> (distil) -> prune -> fine-tune
-> quantize -> artifact.

:class:`CompressHooks` puts the compression events on :func:`effray.train.recipe.run_recipe`:

* before an epoch, a pruning event (``prune_at``, then the sparsity lock) or the start of
  QAT (``apply_quantization``), every rank holding rank 0's BN statistics first; after
  either the loop rebuilds the optimizer and re-prepares DDP (new parameters);
* the loss: KD against the frozen teacher when ``kd_alpha > 0``, else cross-entropy;
* after an epoch: the report, with the fine-tune so far (:func:`progress_payload`) as its
  checkpoint, which :func:`resume_student` goes on from;
* at the end: ``finish`` (the lock released, PTQ if quantizing but still float).

They run at world 1 in this process (:func:`compress_local`: a Tune trial, the benches) and
on W Ray Train workers (:mod:`effray.compress.worker`); :func:`start_fine_tune` is the
setup both share. The steps are free functions in :mod:`effray.compress.steps` and
:mod:`effray.compress.progress`; this module re-exports them as the recipe's public face.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray.compress.artifact import load_artifact, record_temperature, save_artifact
from effray.compress.config import CompressConfig
from effray.compress.distill import freeze_teacher
from effray.compress.features import FeatureKD
from effray.compress.int8 import to_int8
from effray.compress.measure import measure
from effray.compress.progress import progress_payload, resume_student
from effray.compress.prune import SparsityLock, lock_sparsity, weight_sparsity
from effray.compress.quantize import kept_float
from effray.compress.steps import (
    Batches,
    CosineSteps,
    apply_quantization,
    build_student,
    epoch_optimizer,
    fine_tune_loss,
    finish,
    method_summary,
    prune_at,
    prune_events,
    pruned_before,
    quant_epoch,
    save_student,
)
from effray.config import require
from effray.errors import EffrayError
from effray.train.checkpoint import checkpoint_file
from effray.train.parallel import make_strategy, prepare_model
from effray.train.recipe import Hooks, Plan, Run, run_recipe
from effray.train.session import EpochEnd, LocalSession, Session
from effray.train.strategy import Strategy

__all__ = [
    "CompressHooks",
    "compress_local",
    "measure_artifact",
    "measure_teacher",
    "start_fine_tune",
]


class CompressHooks(Hooks):
    """The compression events on the training loop. ``batches(epoch)``: the epoch's batch
    dicts on the device; ``calib``: calibration batches on the device, the same on every
    rank (quantizer ranges and Taylor scores must agree); ``say``: rank 0's lines;
    ``validate(run)``: per-epoch validation metrics, if any; ``extra``: joins every
    epoch's metrics, ``epoch_extra(model, epoch)`` too on rank 0 (a trial's costs)."""

    def __init__(
        self,
        cfg: CompressConfig,
        teacher: nn.Module,
        calib: list[tuple[torch.Tensor, torch.Tensor]],
        batches: Callable[[int], Iterable[dict[str, Any]]],
        *,
        steps_per_epoch: int,
        step: int = 0,
        say: Callable[[str], None] = lambda line: None,
        validate: Callable[[Run], dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        epoch_extra: Callable[[nn.Module, int], dict[str, Any]] | None = None,
        resumed: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.teacher, self.calib, self.epoch_batches = cfg, teacher, calib, batches
        self.events, self.qstart = prune_events(cfg), quant_epoch(cfg)
        self.total, self.first_step = cfg.finetune_epochs * steps_per_epoch, step
        self.say, self.validation, self.extra, self.epoch_extra = say, validate, dict(extra or {}), epoch_extra
        self.features = FeatureKD(cfg.feature_pairs, teacher) if cfg.feature_pairs else None
        self.project: nn.Module | None = None  # the projections as the strategy prepared them
        self.resumed_projections = (resumed or {}).get("kd_projections")
        self.fine_tune_loss = fine_tune_loss(cfg, teacher, self.feature_term if self.features else None)
        self.lock: SparsityLock | None = None
        self.student: nn.Module | None = None  # the finished model, after at_end

    def optimizer(self, run: Run, state: dict[str, Any] | None = None) -> tuple[Any, Any]:
        step = run.scheduler.last_epoch if run.scheduler is not None else self.first_step
        extra = self.attach_features(run)
        optimizer = epoch_optimizer(run.plain, self.cfg, step, self.total, state, extra)
        return optimizer, CosineSteps(optimizer, step, self.total, self.cfg.finetune_lr)

    def attach_features(self, run: Run) -> list[nn.Parameter]:
        """Feature distillation's hooks on the student as it is now (an event may have
        replaced its modules or narrowed them) and its projections, prepared by the run's
        strategy (DDP syncs their gradients); their weights, for the optimizer."""
        if self.features is None:
            return []
        require(bool(self.calib), "--kd-features needs calibration images to size its projections")
        if self.features.attach(run.plain, self.calib[0][0][:1], self.resumed_projections):
            trainable = self.features.trainable()
            self.project = (
                prepare_model(self.features.projector, run.strategy) if trainable else self.features.projector
            )
        self.resumed_projections = None
        return self.features.trainable()

    def feature_term(self) -> torch.Tensor:
        assert self.features is not None and self.project is not None
        return self.features.loss(self.project)

    def batches(self, run: Run, epoch: int) -> Iterable[dict[str, Any]]:
        return self.epoch_batches(epoch)

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.fine_tune_loss(logits, batch)

    def relock(self, model: nn.Module) -> None:
        """Lock the unstructured zeros there are now (a new lock after every event)."""
        if self.lock is not None:
            self.lock.release()
        self.lock = lock_sparsity(model) if self.cfg.prunes and self.cfg.prune_kind == "unstructured" else None

    def before_epoch(self, run: Run, epoch: int) -> bool:
        cfg, pruning, quantizing = self.cfg, epoch in self.events, epoch == self.qstart
        if not (pruning or quantizing):
            return False
        run.strategy.sync_for_eval(run.model)  # rank 0's BN statistics everywhere: folding and scores agree
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        model, rank0 = run.plain, run.session.rank == 0
        if pruning:
            example = self.calib[0][0][:1] if self.calib else None  # traced at the size the model takes
            prune_at(model, cfg, self.events[epoch], example_inputs=example, batches=self.calib)
            if rank0:
                self.say(
                    f"epoch {epoch}: pruned to {self.events[epoch]:.3f} ({cfg.prune_kind}"
                    + (", per layer" if cfg.per_layer_rates else "")
                    + "); "
                    f"weight sparsity {weight_sparsity(model):.3f}" + kept_whole(model)
                )
        if quantizing:
            apply_quantization(model, cfg, self.calib)
            if rank0:
                floats = kept_float(model)
                self.say(
                    f"epoch {epoch}: quantized ({cfg.quant_mode}, {cfg.bits} bits, act {cfg.act_bits})"
                    + (f"; kept in float (a forward of their own): {', '.join(floats)}" if floats else "")
                )
        self.relock(model)
        return True

    def validate(self, run: Run, epoch: int) -> dict[str, Any]:
        return self.validation(run) if self.validation is not None else {}

    def after_epoch(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        metrics = {**metrics, **self.extra}
        if run.session.rank == 0:
            line = f"epoch {epoch + 1}/{self.cfg.finetune_epochs}  loss {metrics['train_loss']:.4f}"
            self.say(line + (f"  val_acc {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else ""))
            if self.epoch_extra is not None:  # under a search: the size of the weights once final
                metrics.update(self.epoch_extra(run.plain, epoch))
        run.history.append({k: v for k, v in metrics.items() if not isinstance(v, list)})
        payload = functools.partial(
            progress_payload,
            run.plain,
            run.optimizer,
            self.cfg,
            epochs_done=epoch + 1,
            step=run.scheduler.last_epoch,
            lock=self.lock,
            device=run.device,
            history=list(run.history),
            kd_projections=self.features.state() if self.features is not None else None,
        )
        run.session.report(EpochEnd(epoch, run.history[-1], run.plain, payload))

    def at_end(self, run: Run) -> None:
        if self.cfg.finetune_epochs == 0:  # one-shot: epoch 0's events, and nothing to train
            self.before_epoch(run, 0)
        run.strategy.sync_for_eval(run.model)
        # every rank: PTQ (if any) is deterministic and the calibration rows are shared
        self.student = finish(run.plain, self.cfg, self.calib, self.lock)
        self.lock = None
        if self.features is not None:  # the hooks leave with the fine-tune; the projections are no part of the student
            self.features.detach()


def kept_whole(model: nn.Module) -> str:
    """The say line's note of the layers structured pruning could not cut, and why."""
    skipped = list(getattr(model, "prune_skipped", None) or [])
    if not skipped:
        return ""
    reasons = sorted({s.partition(": ")[2] for s in skipped})
    names = ", ".join(s.partition(": ")[0] for s in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
    return f"; kept {len(skipped)} layers whole ({names}: {'; '.join(reasons)})"


def start_fine_tune(
    session: Session,
    strategy: Strategy,
    teacher: nn.Module,
    cfg: CompressConfig,
    images: Callable[[], torch.Tensor],
) -> tuple[Run, int, dict[str, Any] | None, dict[str, Any]]:
    """The student to fine-tune, resumed from the session's checkpoint (its RNG restored)
    or built from the teacher (``images()``: a fresh student's data-dependent init), as a
    :class:`Run` prepared by ``strategy``; also ``(LR step, optimizer state, the resumed
    checkpoint or {})`` to start from."""
    restored = session.restore()
    payload: dict[str, Any] = {}
    if restored is not None:
        payload = restored[1]
        model, start, step, state = resume_student(payload, cfg, session.device)
        history = list(payload.get("history", []))
    else:
        model = build_student(teacher, cfg, images=images).to(session.device)
        start, step, state, history = 0, 0, None, []
    return Run(session, strategy, prepare_model(model, strategy), start=start, history=history), step, state, payload


def ready(run: Run, hooks: CompressHooks, state: dict[str, Any] | None) -> None:
    """The optimizer (with a resumed run's momentum) and the lock on zeros it carries."""
    run.optimizer, run.scheduler = hooks.optimizer(run, state)
    if pruned_before(hooks.cfg, run.start):
        hooks.relock(run.plain)


def measure_teacher(teacher: nn.Module, batches: Batches) -> dict[str, Any]:
    """The teacher measured as an fp32 artifact: every ratio's denominator."""
    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(tmp, teacher)
        return measure(teacher, batches, artifact=tmp)


def measure_artifact(
    out: str | Path, cfg: CompressConfig, calib: Batches, evals: Batches, teacher_metrics: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The artifact in ``out`` loaded and measured (the file, not the in-memory model), with
    its int8 runtime (calibrated on the CPU ``calib``) when ``cfg.int8``: ``(metrics, payload)``.
    The temperature fitted on ``evals``' logits in that pass is recorded in the file (its
    size unchanged), so its exports and deployments scale their probabilities by it."""
    loaded, payload = load_artifact(out, trust_code=True)  # written by this run from a teacher it loaded
    int8, skipped = None, ""
    if cfg.int8:
        try:
            int8 = to_int8(loaded, calib, max_batches=cfg.calib_batches)
        except EffrayError as exc:  # a graph PT2E can't lower: measured without it, and said why
            skipped = str(exc)
    metrics = measure(loaded, evals, artifact=out, int8_model=int8, teacher=teacher_metrics)
    if "temperature" in metrics:
        record_temperature(out, metrics["temperature"])
        payload = {**payload, "temperature": metrics["temperature"]}
        metrics["bytes"] = os.path.getsize(checkpoint_file(out))
    return ({**metrics, "int8_skipped": skipped} if skipped else metrics), payload


def compress_local(
    teacher: nn.Module,
    cfg: CompressConfig,
    train_batches: Callable[[int], Batches],
    calib: list[tuple[torch.Tensor, torch.Tensor]],
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]],
    out_dir: str | Path,
    *,
    teacher_info: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    teacher_metrics: dict[str, Any] | None = None,
    steps_per_epoch: int | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int, nn.Module, Callable[[], dict[str, Any]]], None] | None = None,
    resume: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Run the whole recipe in this process; returns the metrics dict (also the teacher's).

    ``train_batches(epoch)`` yields normalised (x, y) batches of one epoch; ``calib`` feeds
    quantizer calibration, Taylor scores and the int8 runtime; ``eval_batches`` the
    accuracy. Teacher, student and every batch fine-tune on ``device`` (a Tune trial's
    GPU); measuring the saved artifact happens on the CPU, as it is deployed there.
    The artifact goes to ``out_dir/model.pt``. ``on_epoch(epoch, model, progress)`` runs
    after every epoch, ``progress()`` building its :func:`progress_payload`; ``resume`` (such
    a payload) goes on after its last epoch."""
    device = torch.device(device)
    teacher = freeze_teacher(teacher)
    if teacher_metrics is None:
        teacher_metrics = measure_teacher(teacher, eval_batches)
    report = None if on_epoch is None else lambda end: on_epoch(end.epoch, end.model, end.payload)
    session = LocalSession(device, resume=resume, on_epoch=report)
    strategy = make_strategy("ddp", device, channels_last=False, compile=False, amp=False)
    run, step, state, resumed = start_fine_tune(
        session, strategy, teacher, cfg, images=lambda: torch.cat([x for x, _ in calib])
    )
    teacher = teacher.to(device)
    on_device = [(x.to(device), y.to(device)) for x, y in calib]  # the int8 runtime calibrates on the CPU copy
    steps = steps_per_epoch or max(1, sum(1 for _ in train_batches(0)))  # for the LR schedule

    def batches(epoch: int) -> Iterable[dict[str, Any]]:
        for x, y in train_batches(epoch):
            yield {"image": x.to(device, non_blocking=True), "label": y.to(device, non_blocking=True)}

    hooks = CompressHooks(cfg, teacher, on_device, batches, steps_per_epoch=steps, step=step, say=log, resumed=resumed)
    ready(run, hooks, state)
    run_recipe(run, Plan(epochs=cfg.finetune_epochs, steps_per_epoch=steps), hooks)
    save_student(out_dir, hooks.student, cfg, teacher.spec, teacher_info=teacher_info, data=data)
    metrics, _ = measure_artifact(out_dir, cfg, calib, eval_batches, teacher_metrics)
    if metrics.get("int8_skipped"):
        log(f"int8 runtime not measured: {metrics['int8_skipped']}")
    loaded, payload = load_artifact(out_dir, trust_code=True)  # just written, from a teacher already loaded
    method = method_summary(loaded, cfg, teacher.spec)  # as the file holds it (k-bit codes that round to 0 are zeros)
    if "skipped" in payload["method"].get("prune", {}):
        method["prune"]["skipped"] = payload["method"]["prune"]["skipped"]
    return {"student": metrics, "teacher": teacher_metrics, "method": method}
