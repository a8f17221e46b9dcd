"""The compression recipe: teacher -> (distil) -> prune -> fine-tune -> quantize -> artifact.

Free functions a training loop calls at fixed points, plus :func:`compress_local`, the
whole recipe in-process (one model, plain batches), which the benchmark runs and which
the Ray Train worker mirrors step for step:

1. ``student = build_student(teacher, cfg)`` (a copy of the teacher, or a registry model)
2. per epoch ``e``: if ``e in prune_events(cfg)``: ``prune_step`` then ``lock_sparsity``;
   if ``e == quant_epoch(cfg)``: ``apply_quantization``; rebuild the optimizer after
   either (parameters changed); then ``train_step`` over the data (KD if ``kd_alpha``)
3. ``finish(model, cfg, calib, lock)``: release the lock, PTQ if quantizing but still float
4. rank 0: ``save_artifact(out, model, method=method_summary(...), ...)``, then
   ``load_artifact`` and ``measure`` the loaded model: the numbers describe the file.

After every epoch a loop may keep ``progress_payload(...)`` (the student as trained so far,
its optimizer, the LR step, the RNG) as a checkpoint; ``resume_student`` turns it back into
the loop's state, so a fine-tune killed with its node (a Tune trial, a Ray Train restart)
goes on from its last epoch instead of from the teacher. Structural events at epochs
before the resume point are already in the restored student and are not replayed.

Epoch plan: pruning events spread over the first half of the epochs when QAT follows
(all of them otherwise); QAT runs from the epoch after the pruning span to the end.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effray.compress.artifact import load_artifact, restore, save_artifact, snapshot
from effray.compress.config import CompressConfig
from effray.compress.distill import check_student, freeze_teacher, kd_loss, teacher_logits
from effray.compress.int8 import to_int8
from effray.compress.measure import measure
from effray.compress.prune import (
    SparsityLock,
    channel_counts,
    lock_sparsity,
    prune_step,
    schedule_rates,
    weight_sparsity,
)
from effray.compress.quantize import QUANTIZERS, bits_per_layer, fold_bn, is_quantized
from effray.config import require, to_dict
from effray.models import build_model
from effray.models.airbench import init_from_data, needs_data_init
from effray.train.checkpoint import FORMATS, rng_state, set_rng_state

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
PROGRESS_FORMAT = "effray.compress.progress/1"


def build_student(
    teacher: nn.Module, cfg: CompressConfig, images: Callable[[], torch.Tensor] | None = None
) -> nn.Module:
    """The model to compress: a trainable copy of the teacher, or a fresh ``cfg.student``
    with the teacher's classes and input channels (checked: a mismatch is one line). A
    fresh student with data-dependent init (airbench's whitening) is set from ``images()``
    (normalised NCHW, the same on every rank), read only when such a student needs it."""

    spec = dict(teacher.spec)
    if not cfg.student:
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        student.spec = spec
        return student.train()
    student_spec = {
        "name": cfg.student,
        "num_classes": spec["num_classes"],
        "in_channels": spec.get("in_channels", 3),
        "width": cfg.student_width,
    }
    check_student(spec, student_spec)
    student = build_model(**student_spec)
    if images is not None and needs_data_init(student):
        init_from_data(student, images())
    return student.train()


def prune_events(cfg: CompressConfig) -> dict[int, float]:
    """Epoch -> target rate of each pruning event (with 0 epochs: one event at epoch 0)."""
    if not cfg.prunes:
        return {}
    steps = cfg.prune_steps if cfg.prune_schedule != "oneshot" else 1
    rates = schedule_rates(cfg.prune_schedule, steps, cfg.prune_rate)
    span = _prune_span(cfg)
    return {math.floor(k * span / steps): r for k, r in enumerate(rates)}  # later events win a shared epoch


def _prune_span(cfg: CompressConfig) -> int:
    e = cfg.finetune_epochs
    return max(1, e // 2) if cfg.quantizes and cfg.quant_mode == "qat" else max(1, e)


def quant_epoch(cfg: CompressConfig) -> int | None:
    """Epoch at whose start QAT begins; None when PTQ happens after training (or no quant)."""
    if not cfg.quantizes or cfg.quant_mode != "qat" or cfg.finetune_epochs == 0:
        return None
    return min(_prune_span(cfg) if cfg.prunes else 0, cfg.finetune_epochs - 1)


def apply_quantization(model: nn.Module, cfg: CompressConfig, calib: Batches, mode: str | None = None) -> nn.Module:
    """Fold BN, then replace every conv/linear with its k-bit fake-quant twin, calibrated."""
    fold_bn(model)
    bits = {
        "bits": cfg.bits,
        "act_bits": cfg.act_bits,
        "first_bits": cfg.first_layer_bits,
        "last_bits": cfg.last_layer_bits,
        "act_range": cfg.act_range,
    }
    return QUANTIZERS.get(mode or cfg.quant_mode)(model, calib, calib_batches=cfg.calib_batches, **bits)


def finish(model: nn.Module, cfg: CompressConfig, calib: Batches, lock: SparsityLock | None = None) -> nn.Module:
    """After the last epoch: drop the sparsity hooks (zeros stay), PTQ if the config asks for
    quantization that training didn't do (``ptq``, or QAT with 0 epochs), eval mode."""
    if lock is not None:
        lock.release()
    if cfg.quantizes and not is_quantized(model):
        apply_quantization(model, cfg, calib, mode="ptq")
    return model.eval()


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD + Nesterov; weight decay only on conv/linear weights (not BN, biases, step sizes)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and p.dim() > 1]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )


def epoch_optimizer(
    model: nn.Module, cfg: CompressConfig, step: int, total: int, state: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The optimizer from the start of an epoch whose parameters are new (the first, or one
    after pruning or quantization), at the schedule's LR; ``state`` is a resumed run's
    momentum, for the same parameters."""
    optimizer = make_optimizer(model, cosine_lr(step, total, cfg.finetune_lr))
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer


def cosine_lr(step: int, total: int, peak: float) -> float:
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_step(
    model: nn.Module,
    teacher: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: CompressConfig,
) -> torch.Tensor:
    """One optimizer step: KD against the frozen teacher when ``kd_alpha > 0``, else CE.
    Returns the detached loss on the device (callers sum it there and read it per epoch)."""
    logits = model(x)
    if cfg.distills and teacher is not None:
        loss = kd_loss(logits, teacher_logits(teacher, x), y, cfg.kd_temperature, cfg.kd_alpha)
    else:
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def method_summary(model: nn.Module, cfg: CompressConfig, teacher_spec: dict[str, Any]) -> dict[str, Any]:
    """What was done, measured on the model itself (sparsity, per-layer bits, channels)."""
    out: dict[str, Any] = {"student": dict(model.spec), "teacher_model": dict(teacher_spec)}
    if cfg.prunes:
        out["prune"] = {
            "kind": cfg.prune_kind,
            "rate": cfg.prune_rate,
            "importance": cfg.prune_importance,
            "schedule": cfg.prune_schedule,
            "steps": cfg.prune_steps,
            "weight_sparsity": weight_sparsity(model),
            "channels": channel_counts(model),
        }
    if is_quantized(model):
        out["quant"] = {
            "mode": cfg.quant_mode,
            "bits": cfg.bits,
            "act_bits": cfg.act_bits,
            "act_range": cfg.act_range,
            "first_layer_bits": cfg.first_layer_bits,
            "last_layer_bits": cfg.last_layer_bits,
            "bn_folded": True,
            "bits_per_layer": bits_per_layer(model),
        }
    if cfg.distills:
        out["kd"] = {"temperature": cfg.kd_temperature, "alpha": cfg.kd_alpha}
    return out


def progress_payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: CompressConfig,
    *,
    epochs_done: int,
    step: int,
    lock: SparsityLock | None,
    device: torch.device | str = "cpu",
    **extra: Any,
) -> dict[str, Any]:
    """What a fine-tune resumes from after ``epochs_done`` epochs: the student's modules and
    latent weights (:func:`effray.compress.artifact.snapshot`), the optimizer, the LR step,
    the RNG, the config it belongs to, and ``extra`` (e.g. the epochs reported so far).
    Weights-only loadable, like every effray checkpoint."""
    if lock is not None:
        lock.apply()  # the last optimizer step moved masked weights; the next forward would re-zero them
    return {
        "format": PROGRESS_FORMAT,
        "epochs_done": epochs_done,
        "step": step,
        "student": snapshot(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(torch.device(device)),
        "config": to_dict(cfg),
        **extra,
    }


def resume_student(
    payload: dict[str, Any], cfg: CompressConfig, device: torch.device | str = "cpu"
) -> tuple[nn.Module, int, int, dict[str, Any]]:
    """``(student on device, epochs done, LR step, optimizer state)`` from
    :func:`progress_payload`; the RNG is restored too. A checkpoint of another config (a
    changed search space under the same experiment name) is refused in one line."""
    require(
        payload.get("format") == PROGRESS_FORMAT,
        f"not a fine-tuning checkpoint ({payload.get('format')!r}, expected {PROGRESS_FORMAT})",
    )
    require(
        payload.get("config") == to_dict(cfg),
        "the fine-tuning checkpoint belongs to another compression config; resume with the same config or use a new "
        "--name",
    )
    device = torch.device(device)
    model = restore(payload["student"], learn=True).to(device)
    set_rng_state(payload["rng"], device)
    return model, int(payload["epochs_done"]), int(payload["step"]), payload["optimizer"]


def pruned_before(cfg: CompressConfig, epoch: int) -> bool:
    """Whether a resumed student carries unstructured zeros from before ``epoch`` (to lock again)."""
    return cfg.prunes and cfg.prune_kind == "unstructured" and any(e < epoch for e in prune_events(cfg))


@FORMATS.register(PROGRESS_FORMAT)
def _progress_model(payload: dict[str, Any]) -> nn.Module:
    """A mid-compression checkpoint opens as the student it holds (``effray evaluate`` on it)."""
    return restore(payload["student"], learn=False).eval()


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
        with tempfile.TemporaryDirectory() as tmp:  # the teacher as an fp32 artifact: the size baseline
            save_artifact(tmp, teacher)
            teacher_metrics = measure(teacher, eval_batches, artifact=tmp)
    if resume is not None:
        model, start, step, optimizer_state = resume_student(resume, cfg, device)
    else:
        model = build_student(teacher, cfg, images=lambda: torch.cat([x for x, _ in calib])).to(device)
        start, step, optimizer_state = 0, 0, None
    teacher = teacher.to(device)
    host_calib = calib  # the int8 runtime calibrates on the CPU
    calib = [(x.to(device), y.to(device)) for x, y in calib]
    events, qstart = prune_events(cfg), quant_epoch(cfg)
    epochs = cfg.finetune_epochs
    steps_per_epoch = steps_per_epoch or max(1, sum(1 for _ in train_batches(0)))  # for the LR schedule
    total, lock = epochs * steps_per_epoch, None

    def release() -> None:
        nonlocal lock
        if lock is not None:
            lock.release()
            lock = None

    def relock() -> SparsityLock | None:
        return lock_sparsity(model) if cfg.prunes and cfg.prune_kind == "unstructured" else None

    for epoch in range(start, max(epochs, 1)):
        changed = False
        if epoch in events:
            release()
            prune_step(model, events[epoch], cfg.prune_kind, cfg.prune_importance, batches=calib)
            log(
                f"epoch {epoch}: pruned to {events[epoch]:.3f} ({cfg.prune_kind}); weight sparsity "
                f"{weight_sparsity(model):.3f}"
            )
            changed = True
        if epoch == qstart:
            release()
            apply_quantization(model, cfg, calib)
            log(f"epoch {epoch}: quantized ({cfg.quant_mode}, {cfg.bits} bits, act {cfg.act_bits})")
            changed = True
        if changed or epoch == start:
            lock = relock() if changed or pruned_before(cfg, start) else lock
            optimizer = epoch_optimizer(model, cfg, step, total, None if changed else optimizer_state)
            optimizer_state = None
        if epochs == 0:
            break
        model.train()
        loss_sum, batches = torch.zeros((), dtype=torch.float64, device=device), 0
        for x, y in train_batches(epoch):
            for g in optimizer.param_groups:
                g["lr"] = cosine_lr(step, total, cfg.finetune_lr)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss_sum += train_step(model, teacher, x, y, optimizer, cfg).double()
            step, batches = step + 1, batches + 1
        log(f"epoch {epoch}: loss {float(loss_sum) / max(batches, 1):.4f}")  # the epoch's one host read
        if on_epoch is not None:  # e.g. a Tune report, so a scheduler can stop poor trials
            was_training = model.training
            progress = functools.partial(
                progress_payload, model, optimizer, cfg, epochs_done=epoch + 1, step=step, lock=lock, device=device
            )
            on_epoch(epoch, model.eval(), progress)
            model.train(was_training)
    finish(model, cfg, calib, lock)
    out = Path(out_dir)
    save_artifact(
        out,
        model.cpu(),
        method=method_summary(model, cfg, teacher.spec),
        config=to_dict(cfg),
        teacher=teacher_info or {},
        data=data,
        codec=cfg.codec,
    )
    loaded, _ = load_artifact(out)  # measure the file, not the in-memory model
    int8 = to_int8(loaded, host_calib, max_batches=cfg.calib_batches) if cfg.int8 else None
    metrics = measure(loaded, eval_batches, artifact=out, int8_model=int8, teacher=teacher_metrics)
    return {"student": metrics, "teacher": teacher_metrics, "method": method_summary(loaded, cfg, teacher.spec)}
