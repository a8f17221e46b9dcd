"""The compression recipe's steps as free functions, in the order a fine-tune meets them.

1. ``student = build_student(teacher, cfg)`` (a copy of the teacher, or a registry model);
2. the epoch plan: ``prune_events(cfg)`` (epoch -> rate) and ``quant_epoch(cfg)``: pruning
   events spread over the first half of the epochs when QAT follows (all of them
   otherwise), QAT from the epoch after the pruning span to the end;
3. at an event, ``prune_step`` (:mod:`effray.compress.prune`) or ``apply_quantization``,
   then a new optimizer (``epoch_optimizer``, its LR on the cosine ``CosineSteps``);
4. every step, ``fine_tune_loss``: KD against the frozen teacher, or cross-entropy;
5. ``finish(model, cfg, calib, lock)``: release the lock, PTQ if quantizing but still float;
6. ``save_student``: the artifact, with ``method_summary`` measured on the model itself.

The loop that calls them is the training loop's (:mod:`effray.compress.recipe` hooks them
into :mod:`effray.train.recipe`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effray.compress.artifact import save_artifact
from effray.compress.config import CompressConfig
from effray.compress.distill import check_student, kd_loss, teacher_logits
from effray.compress.features import check_feature_names
from effray.compress.layers import classifier
from effray.compress.prune import (
    SparsityLock,
    channel_counts,
    layer_sparsity,
    prunable_layers,
    prune_step,
    weight_sparsity,
)
from effray.compress.quantize import (
    QUANTIZERS,
    bits_per_layer,
    bn_pairs,
    fold_bn,
    fold_linked,
    is_quantized,
    kept_float,
    quantizable,
    recalibrate_bn,
)
from effray.compress.schedule import schedule_rates
from effray.config import require, to_dict
from effray.models import build_model
from effray.models.airbench import init_from_data, needs_data_init
from effray.models.weights import initial_weights
from effray.train.strategy import LossFn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def build_student(
    teacher: nn.Module, cfg: CompressConfig, images: Callable[[], torch.Tensor] | None = None
) -> nn.Module:
    """The model to compress: a trainable copy of the teacher, or a fresh ``cfg.student``
    with the teacher's classes and input channels (checked: a mismatch is one line). A
    fresh student with data-dependent init (airbench's whitening) is set from ``images()``
    (normalised NCHW, the same on every rank), read only when such a student needs it."""

    spec = dict(teacher.spec)
    check_feature_names(teacher, list(cfg.feature_pairs.values()), "teacher")
    if not cfg.student:
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        student.spec = spec
        return check_layer_names(student, cfg).train()
    student_spec = {
        "name": cfg.student,
        "num_classes": spec["num_classes"],
        "in_channels": spec.get("in_channels", 3),
        "width": cfg.student_width,
    }
    check_student(spec, student_spec)
    student = build_model(**student_spec)
    if cfg.student_weights or cfg.student_pretrained:
        initial_weights(student, cfg.student_weights, cfg.student if cfg.student_pretrained else "")
    elif images is not None and needs_data_init(student):
        init_from_data(student, images())
    return check_layer_names(student, cfg).train()


def check_layer_names(model: nn.Module, cfg: CompressConfig) -> nn.Module:
    """Fail in one line, before any training, when ``--layer-bits``/``--layer-rates`` name a
    layer ``model`` has no quantizable (resp. prunable) conv/linear of, or ``--kd-features``
    a module it lacks."""
    layers = dict(prunable_layers(model))
    for flag, names, known in (
        ("--layer-bits", cfg.bits_by_layer, {n for n, m in layers.items() if quantizable(m)}),
        ("--layer-rates", cfg.rates_by_layer, set(layers)),
    ):
        unknown = sorted(set(names) - known)
        require(
            not unknown,
            f"{flag} names {', '.join(unknown[:3])}, not a {'quantizable ' if 'bits' in flag else ''}conv/linear "
            f"layer of {model.spec.get('name')}; its layers: {', '.join(sorted(known)[:6])}"
            + (", ..." if len(known) > 6 else ""),
        )
    out = classifier(model)
    named_out = [n for n, m in layers.items() if m is out and cfg.rates_by_layer.get(n, 0.0) > 0]
    require(
        cfg.prune_kind != "structured" or not named_out,
        f"--layer-rates {named_out[0] if named_out else ''}: structured pruning keeps the classifier's outputs "
        "(the classes); leave it out of --layer-rates or prune it unstructured",
    )
    check_feature_names(model, list(cfg.feature_pairs), "student")
    return model


def prune_events(cfg: CompressConfig) -> dict[int, float]:
    """Epoch -> target rate of each pruning event (with 0 epochs: one event at epoch 0)."""
    if not cfg.prunes:
        return {}
    steps = cfg.prune_steps if cfg.prune_schedule != "oneshot" else 1
    rates = schedule_rates(cfg.prune_schedule, steps, cfg.final_rate)
    span = _prune_span(cfg)
    return {math.floor(k * span / steps): r for k, r in enumerate(rates)}  # later events win a shared epoch


def prune_at(
    model: nn.Module,
    cfg: CompressConfig,
    rate: float,
    *,
    example_inputs: torch.Tensor | None = None,
    batches: Batches | None = None,
) -> nn.Module:
    """A pruning event of ``cfg``'s schedule at ``rate`` (one of :func:`prune_events`'): global,
    or with ``--layer-rates`` each layer at its own rate scaled by ``rate / cfg.final_rate``
    (the unnamed layers at ``--prune-rate``, the classifier at 0 unless named)."""
    layer_rates = None
    if cfg.per_layer_rates:
        named, out, share = cfg.rates_by_layer, classifier(model), rate / cfg.final_rate
        layer_rates = {n: named.get(n, 0.0 if m is out else cfg.prune_rate) * share for n, m in prunable_layers(model)}
    return prune_step(
        model,
        rate,
        cfg.prune_kind,
        cfg.prune_importance,
        example_inputs=example_inputs,
        batches=batches,
        layer_rates=layer_rates,
    )


def _prune_span(cfg: CompressConfig) -> int:
    e = cfg.finetune_epochs
    return max(1, e // 2) if cfg.quantizes and cfg.quant_mode == "qat" else max(1, e)


def quant_epoch(cfg: CompressConfig) -> int | None:
    """Epoch at whose start QAT begins; None when PTQ happens after training (or no quant)."""
    if not cfg.quantizes or cfg.quant_mode != "qat" or cfg.finetune_epochs == 0:
        return None
    return min(_prune_span(cfg) if cfg.prunes else 0, cfg.finetune_epochs - 1)


def pruned_before(cfg: CompressConfig, epoch: int) -> bool:
    """Whether a resumed student carries unstructured zeros from before ``epoch`` (to lock again)."""
    return cfg.prunes and cfg.prune_kind == "unstructured" and any(e < epoch for e in prune_events(cfg))


def apply_quantization(model: nn.Module, cfg: CompressConfig, calib: Batches, mode: str | None = None) -> nn.Module:
    """Replace every conv/linear with its k-bit fake-quant twin, calibrated. The BNs they feed
    are folded first, or, for QAT with ``--qat-bn simulate``, kept while training (their
    statistics re-estimated on ``calib`` first) and their fold simulated (folded for real by
    :func:`finish`)."""
    mode = mode or cfg.quant_mode
    pairs = bn_pairs(model)
    simulate = mode == "qat" and cfg.qat_bn == "simulate"
    if not simulate:
        fold_bn(model, pairs)
    elif pairs:
        recalibrate_bn(model, calib, cfg.calib_batches)
    bits = {
        "bits": cfg.bits,
        "act_bits": cfg.act_bits,
        "first_bits": cfg.first_layer_bits,
        "last_bits": cfg.last_layer_bits,
        "act_range": cfg.act_range,
        "layer_bits": cfg.bits_by_layer,
        "simulate_bn": pairs if simulate else None,
    }
    return QUANTIZERS.get(mode)(model, calib, calib_batches=cfg.calib_batches, **bits)


def finish(model: nn.Module, cfg: CompressConfig, calib: Batches, lock: SparsityLock | None = None) -> nn.Module:
    """After the last epoch: drop the sparsity hooks (zeros stay), fold the BNs whose fold QAT
    simulated, PTQ if the config asks for quantization that training didn't do (``ptq``, or
    QAT with 0 epochs), eval mode."""
    if lock is not None:
        lock.release()
    fold_linked(model)
    if cfg.quantizes and not is_quantized(model):
        apply_quantization(model, cfg, calib, mode="ptq")
    return model.eval()


def make_optimizer(model: nn.Module, lr: float, extra: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """SGD + Nesterov; weight decay only on conv/linear weights (not BN, biases, step sizes).
    ``extra``: weights that train beside the model (feature distillation's projections)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and p.dim() > 1]
    decay += list(extra)
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )


def epoch_optimizer(
    model: nn.Module,
    cfg: CompressConfig,
    step: int,
    total: int,
    state: dict[str, Any] | None = None,
    extra: Iterable[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """The optimizer from the start of an epoch whose parameters are new (the first, or one
    after pruning or quantization), at the schedule's LR; ``state`` is a resumed run's
    momentum, for the same parameters."""
    optimizer = make_optimizer(model, cosine_lr(step, total, cfg.finetune_lr), extra)
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer


def cosine_lr(step: int, total: int, peak: float) -> float:
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class CosineSteps:
    """The fine-tune's LR schedule as a scheduler the training step steps: after optimizer
    step ``s`` every group's LR is ``cosine_lr(s, total, peak)``, the LR of the next step.
    ``last_epoch`` counts the steps, as torch's schedulers do."""

    def __init__(self, optimizer: torch.optim.Optimizer, step: int, total: int, peak: float) -> None:
        self.optimizer, self.last_epoch, self.total, self.peak = optimizer, step - 1, total, peak
        self.step()  # the LR of step ``step`` (a resumed optimizer's state holds the one it saved)

    def step(self) -> None:
        self.last_epoch += 1
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.last_epoch, self.total, self.peak)


def fine_tune_loss(
    cfg: CompressConfig, teacher: nn.Module | None, features: Callable[[], torch.Tensor] | None = None
) -> LossFn:
    """The fine-tune's loss on a batch dict: KD against the frozen teacher (its logits on
    the batch's images, no graph) when ``kd_alpha > 0``, else cross-entropy on the labels;
    plus ``kd_feature_weight`` times ``features()`` (feature distillation's term for the
    forwards that just ran) when given."""

    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["label"].to(logits.device, non_blocking=True)
        if teacher is None or not (cfg.distills or features is not None):
            return F.cross_entropy(logits, labels)
        soft = teacher_logits(teacher, batch["image"].to(logits.device, non_blocking=True))
        out = (
            kd_loss(logits, soft, labels, cfg.kd_temperature, cfg.kd_alpha)
            if cfg.distills
            else F.cross_entropy(logits, labels)
        )
        return out + cfg.kd_feature_weight * features() if features is not None else out

    return loss


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
        if cfg.per_layer_rates and cfg.prune_kind == "unstructured":  # the zeros each layer really holds
            out["prune"]["sparsity_per_layer"] = layer_sparsity(model)
        elif cfg.per_layer_rates:  # the channels each layer kept: coupled layers follow their group
            out["prune"]["channels_per_layer"] = {n: int(m.weight.shape[0]) for n, m in prunable_layers(model)}
        if getattr(model, "prune_skipped", None):  # layers structured pruning kept whole, and why
            out["prune"]["skipped"] = list(model.prune_skipped)
    if is_quantized(model):
        out["quant"] = {
            "mode": cfg.quant_mode,
            "bits": cfg.bits,
            "act_bits": cfg.act_bits,
            "act_range": cfg.act_range,
            "first_layer_bits": cfg.first_layer_bits,
            "last_layer_bits": cfg.last_layer_bits,
            "bn_folded": True,
            **({"qat_bn": cfg.qat_bn} if cfg.quant_mode == "qat" else {}),
            "bits_per_layer": bits_per_layer(model),
        }
        if kept_float(model):  # a library's conv/linear subclass with a forward of its own
            out["quant"]["kept_float"] = kept_float(model)
    if cfg.allocation != "uniform":
        out["allocation"] = cfg.allocation  # the table it came from is the config's (every byte counts)
    if cfg.distills:
        out["kd"] = {"temperature": cfg.kd_temperature, "alpha": cfg.kd_alpha}
    if cfg.feature_pairs:
        out["kd_features"] = {"pairs": cfg.feature_pairs, "weight": cfg.kd_feature_weight}
    return out


def save_student(
    out: str | Path,
    model: nn.Module,
    cfg: CompressConfig,
    teacher_spec: dict[str, Any],
    *,
    teacher_info: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """The finished student as an artifact in ``out`` (moved to the CPU: it is deployed there)."""
    return save_artifact(
        out,
        model.cpu(),
        method=method_summary(model, cfg, teacher_spec),
        config=to_dict(cfg),
        teacher=teacher_info or {},
        data=data,
        codec=cfg.codec,
    )
