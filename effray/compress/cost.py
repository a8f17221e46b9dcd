"""What a compression config will cost, known before it trains: bytes, params, MACs.

A search can drop configs that cannot meet a size or MAC budget before they take a GPU,
and a multi-objective scheduler (accuracy vs size) needs each trial's cost from its first
epoch, not after its last. Shapes after pruning, bits per layer and the zeros a rate
leaves are fixed by the teacher and the config alone, so the prediction does not model
the recipe, it runs it: the recipe's own steps replay on a CPU copy (every pruning event
at its rate, the quantization, ``finish``), one SGD step on a random batch standing in
for each fine-tuning phase, and the result is written by the recipe's own
``save_artifact`` and counted by ``measure``'s own functions on the file read back.

Params and MACs are exact by construction. What depends on trained values is close, not
exact: LZMA's ratio (the step moves biases, BN shifts and statistics off their init 0s
and 1s, which would otherwise compress to nothing), weights whose k-bit code rounds to 0
after QAT, and, for Taylor importance (scored here on the random batch's gradients, the
rate and so every count being the same) or a gradual unstructured schedule, which layers
a global prune thins, i.e. ``sparse_macs``. The first is the largest: fine-tuning at a
high LR leaves k-bit codes that compress further than the stand-in's (so the prediction
errs large, and a budget drops no config that would have fit), by more than the spread
between two real runs of one config allows any prediction to close. Once a trial's
weights are in their final form, :func:`bytes_so_far` measures them instead, each epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray.compress.artifact import load_artifact, save_artifact
from effray.compress.config import OFF, CompressConfig
from effray.compress.measure import count_macs, nonzero_parameters, parameter_count
from effray.compress.prune import lock_sparsity
from effray.compress.quantize import is_quantized
from effray.compress.steps import (
    CosineSteps,
    apply_quantization,
    build_student,
    fine_tune_loss,
    finish,
    make_optimizer,
    method_summary,
    prune_at,
    prune_events,
    quant_epoch,
)
from effray.config import require, to_dict, validated
from effray.train.parallel import make_strategy
from effray.train.step import train_step

SEED = 0
BATCH = 8  # synthetic images per batch: calibration only sets scales, Taylor only ranks


def predict_costs(
    teacher: nn.Module,
    cfg: CompressConfig,
    input_shape: tuple[int, ...] | None = None,
    *,
    teacher_info: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, int]:
    """``bytes`` (of the model.pt the run would save), ``params``, ``nonzero_params``,
    ``macs`` and ``sparse_macs`` (as :func:`~effray.compress.measure.measure` reports them)
    of compressing ``teacher`` with ``cfg``, without data or training. ``teacher_info`` and
    ``data`` are the artifact's metadata, as the run passes them (a few hundred bytes).

    Deterministic (seeded; the caller's RNG is left as it was), on the CPU whatever device
    the teacher is on, and the teacher is not touched."""
    cfg = validated(cfg)
    spec = dict(teacher.spec)
    shape = _input_shape(spec, input_shape, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        batch = _stand_in(spec, shape)
        model = _replay(_student(teacher, cfg, batch), cfg, batch)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_artifact(
                tmp,
                model,
                method=method_summary(model, cfg, spec),
                config=to_dict(cfg),
                teacher=teacher_info or {},
                data=data,
                codec=cfg.codec,
            )
            loaded, _ = load_artifact(tmp, trust_code=True)  # measured as the run measures: the file read back
            out = {
                "bytes": os.path.getsize(path),
                "params": parameter_count(loaded),
                "nonzero_params": nonzero_parameters(loaded),
            }
        out.update(count_macs(loaded, shape))
    return out


def pruned_student(
    teacher: nn.Module,
    cfg: CompressConfig,
    input_shape: tuple[int, ...] | None = None,
    *,
    data: dict[str, Any] | None = None,
) -> nn.Module:
    """The student ``cfg`` builds with the recipe's pruning events replayed (channel cuts
    included) and nothing quantized, as :func:`predict_costs` replays them: the shapes and
    weights a per-layer bit allocation of a channel-cut model prices its layers on
    (:mod:`effray.compress.allocate`). Deterministic, on the CPU; the teacher is not touched."""
    float_cfg = validated(dataclasses.replace(cfg, bits=OFF, layer_bits=""))
    spec = dict(teacher.spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        batch = _stand_in(spec, _input_shape(spec, input_shape, data))
        return _replay(_student(teacher, float_cfg, batch), float_cfg, batch)


def _input_shape(spec: dict[str, Any], given: tuple[int, ...] | None, data: dict[str, Any] | None) -> tuple[int, ...]:
    """CHW the teacher takes: ``given``, else the data's recorded size, else 32 px."""
    if given is None and data and "image_shape" in data:  # HWC
        given = (int(data["image_shape"][2]), int(data["image_shape"][0]), int(data["image_shape"][1]))
    return tuple(given) if given is not None else (int(spec.get("in_channels", 3)), 32, 32)


def _stand_in(spec: dict[str, Any], shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One seeded random batch standing in for data (calibration sets scales, Taylor ranks)."""
    return [(torch.randn(BATCH, *shape), torch.randint(0, int(spec["num_classes"]), (BATCH,)))]


def bytes_so_far(
    model: nn.Module,
    cfg: CompressConfig,
    epoch: int,
    teacher_spec: dict[str, Any],
    *,
    teacher_info: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> int | None:
    """The bytes of the artifact a run would save if it stopped after ``epoch`` (0-based):
    its current weights through the save path. ``None`` while a later epoch still prunes or
    quantizes (or PTQ follows training): then the weights are not in their final form yet
    and :func:`predict_costs` is the estimate.

    What fine-tuning leaves in the weights decides LZMA's ratio on the k-bit codes, and no
    prediction made before training knows it (the LR and even the data order move it:
    ``bench/cost_prediction.py``), so a trial reports this each epoch and the scheduler ranks
    rungs by it. Call it after a forward pass (an unstructured run's sparsity hooks re-zero
    the pruned weights there); one host read of the weights per epoch, never per step."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_so_far(tmp, model, cfg, epoch, teacher_spec, teacher_info=teacher_info, data=data)
        return None if path is None else os.path.getsize(path)


def save_so_far(
    directory: str | os.PathLike,
    model: nn.Module,
    cfg: CompressConfig,
    epoch: int,
    teacher_spec: dict[str, Any],
    *,
    teacher_info: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> Path | None:
    """:func:`bytes_so_far`'s artifact, saved into ``directory``; its path, or None while
    the weights are not in their final form."""
    if any(e > epoch for e in prune_events(cfg)) or (quant_epoch(cfg) or 0) > epoch:
        return None
    if cfg.quantizes and not is_quantized(model):
        return None
    return Path(
        save_artifact(
            directory,
            _on_cpu(model),
            method=method_summary(model, cfg, teacher_spec),
            config=to_dict(cfg),
            teacher=teacher_info or {},
            data=data,
            codec=cfg.codec,
        )
    )


def epoch_costs(
    predicted: dict[str, Any],
    model: nn.Module,
    cfg: CompressConfig,
    epoch: int,
    teacher_spec: dict[str, Any],
    *,
    latency: Callable[[str], float] | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """A trial's cost fields for its report after ``epoch``: ``predicted`` (its
    ``predicted_*`` before training), with ``predicted_bytes`` replaced by
    :func:`bytes_so_far` once the weights are final; ``bytes_from`` says which it is.
    ``latency(artifact_dir)``: the batch-1 ms of the artifact saved there as deployed (an
    export timed on its runtime; None when it has none), which then replaces
    ``predicted_latency_ms``, a MAC-scaled estimate until then (``latency_from`` says which)."""
    if "predicted_bytes" not in predicted:
        return dict(predicted)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_so_far(tmp, model, cfg, epoch, teacher_spec, **meta)
        if path is None:
            return {**predicted, "bytes_from": "config", **({"latency_from": "macs"} if latency else {})}
        out = {**predicted, "predicted_bytes": os.path.getsize(path), "bytes_from": "weights"}
        if latency is not None:
            ms = latency(tmp)
            out.update(
                {"latency_from": "macs"} if ms is None else {"predicted_latency_ms": ms, "latency_from": "export"}
            )
        return out


def _student(teacher: nn.Module, cfg: CompressConfig, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """``build_student`` from a CPU view of the teacher (it copies what it keeps)."""
    return build_student(_on_cpu(teacher), cfg, images=lambda: batch[0][0]).cpu()


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when it lives on the CPU (``build_student`` copies what it keeps);
    otherwise a CPU copy made tensor by tensor without the hooks (a sparsity lock's masks
    are not copied), never a second copy on the model's device."""
    if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
        return model
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().cpu(), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach().cpu() for b in model.buffers()})
    for m in model.modules():
        memo.update(
            {id(m._forward_pre_hooks): type(m._forward_pre_hooks)(), id(m._forward_hooks): type(m._forward_hooks)()}
        )
    return copy.deepcopy(model, memo)  # every parameter and buffer is a CPU copy already


def _replay(model: nn.Module, cfg: CompressConfig, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """The recipe's epoch plan with each fine-tuning phase cut to one SGD step on ``batch``.

    Structure: every pruning event at its own rate, in order (a gradual structured
    schedule rounds its channel counts as the run does), then the quantization. The step:
    after fine-tuning no bias, BN shift or running statistic keeps its init value (0 or 1,
    which LZMA squeezes to nothing and which count as zeros); one step moves them all."""
    events, qstart = prune_events(cfg), quant_epoch(cfg)
    cpu = make_strategy("ddp", torch.device("cpu"), channels_last=False, compile=False, amp=False)
    phases = set(events) | ({qstart} if qstart is not None else set())
    if cfg.finetune_epochs:
        phases.add(0)  # a run that only distils still fine-tunes
    lock = None
    for epoch in sorted(phases):
        if lock is not None:
            lock.release()
            lock = None
        if epoch in events:
            prune_at(model, cfg, events[epoch], batches=batch, example_inputs=batch[0][0][:1])
        if epoch == qstart:
            apply_quantization(model, cfg, batch)
        if cfg.prunes and cfg.prune_kind == "unstructured":
            lock = lock_sparsity(model)
        if cfg.finetune_epochs:
            model.train()
            optimizer = make_optimizer(model, cfg.finetune_lr)
            x, y = batch[0]
            sums = torch.zeros(2, dtype=torch.float64)
            step = CosineSteps(optimizer, 0, 1, cfg.finetune_lr)
            train_step(cpu, model, optimizer, step, {"image": x, "label": y}, fine_tune_loss(cfg, None), sums)
    return finish(model, cfg, batch, lock)


def estimate_latency_ms(macs: int, teacher_macs: int, teacher_latency_ms: float) -> float:
    """The student's latency estimated as the teacher's measured latency scaled by MACs.

    Only an estimate for ranking before training (memory traffic, kernel choice and int8
    runtimes do not scale with MACs); the real latency is measured on the artifact at the end."""
    require(teacher_macs > 0, f"teacher MACs must be > 0, got {teacher_macs}")
    return float(teacher_latency_ms) * float(macs) / float(teacher_macs)
