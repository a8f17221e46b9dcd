"""What a (compressed) model really is: accuracy, parameters, MACs, bytes on disk, latency.

Everything is measured, nothing inferred from a config: MACs come from a real forward
under ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), bytes from the
file on disk, latency from repeated timed forwards (median, thread count in the result).
Zeros in the weights don't make dense kernels cheaper, so ``macs`` is what a dense
runtime pays and ``sparse_macs`` what a sparsity-exploiting one could (each conv/linear's
MACs times its weight density).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from effray.compress.fakequant import ActQuant, WeightQuant
from effray.compress.layers import model_device
from effray.compress.quantize import dequantize, is_quantized
from effray.metrics import classification_metrics, scaled_calibration, score_batches
from effray.train.validate import reported

# seconds of timed calls per model after which latency_ms stops repeating, and the fewest it times
LATENCY_BUDGET_S = 3.0
MIN_REPEATS = 3

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """Model parameters, not quantizer step sizes (they are counted as scales, not weights)."""
    skip = {id(p) for m in model.modules() if isinstance(m, (WeightQuant, ActQuant)) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in _weights(model))


def nonzero_parameters(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in _weights(model))


def _example(model: nn.Module, batch: int, shape: tuple[int, ...] | None) -> torch.Tensor:
    if shape is None:
        shape = (int(getattr(model, "spec", {}).get("in_channels", 3)), 32, 32)
    return torch.randn(batch, *shape)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, int]:
    """``macs`` (FlopCounterMode, one image) and ``sparse_macs`` (conv/linear MACs scaled by
    their weight density; everything else as counted)."""
    was = model.training
    model.eval()
    x = _example(model, 1, input_shape)
    layer: list[tuple[int, float]] = []

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        w = m.weight
        per_out = w[0].numel()  # in_channels/groups * kh * kw (conv) or in_features (linear)
        layer.append((out.numel() * per_out, float((w != 0).float().mean())))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    macs = counter.get_total_flops() // 2
    dense_layers = sum(m for m, _ in layer)
    sparse = macs - dense_layers + sum(m * d for m, d in layer)
    return {"macs": int(macs), "sparse_macs": int(round(sparse))}


@torch.no_grad()
def latency_ms(
    *models: nn.Module,
    batch_size: int,
    input_shape: tuple[int, ...] | None = None,
    repeats: int = 10,
    warmup: int = 2,
    budget_s: float = LATENCY_BUDGET_S,
) -> list[float]:
    """Median wall time (ms) of one forward of each model at ``batch_size``, threads as set.

    Several models are timed interleaved (a, b, a, b, ...), so load from other processes
    on a shared machine hits all of them alike and their ratio stays fair. Slow calls stop
    early (a large model's large batch takes seconds a call on a CPU): no second warm-up
    call after one that took a tenth of ``budget_s``, and no more timed rounds once they
    have taken ``budget_s`` per model, :data:`MIN_REPEATS` at least."""
    x = _example(models[0], batch_size, input_shape)
    for m in models:
        m.eval()
        for _ in range(warmup):
            t = time.perf_counter()
            m(x)
            if time.perf_counter() - t > budget_s / 10:
                break
    times: list[list[float]] = [[] for _ in models]
    started = time.perf_counter()
    for r in range(repeats):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m(x)
            times[i].append(time.perf_counter() - t)
        if r + 1 >= MIN_REPEATS and time.perf_counter() - started > budget_s * len(models):
            break
    return [statistics.median(t) * 1000.0 for t in times]


def scored(model: nn.Module, batches: Batches, keep_logits: bool = False) -> dict[str, Any]:
    """:func:`effray.metrics.score_batches` of ``model`` (in eval mode, on its device) over
    (normalised images, labels) batches: the sums stay on the device until the end."""
    was = model.training
    model.eval()
    device = model_device(model)
    try:
        return score_batches(lambda x: model(x.to(device, non_blocking=True)), batches, None, keep_logits=keep_logits)
    finally:
        model.train(was)


def accuracy(model: nn.Module, batches: Batches) -> tuple[float, int]:
    """(top-1 accuracy, images) over (normalised images, labels) batches, on the model's
    device (one host read, at the end)."""
    m = scored(model, batches)
    return (m["accuracy"] if m["count"] else float("nan")), m["count"]


def epoch_scores(model: nn.Module, batches: Batches) -> dict[str, Any]:
    """What a fine-tune's epoch reports of ``model`` on val (:func:`effray.train.validate.reported`:
    ``val_accuracy``, ``val_worst_class_recall``, ...); the accuracy is NaN without rows."""
    m = scored(model, batches)
    return reported({**m, "accuracy": m["accuracy"] if m["count"] else float("nan")})


def class_scores(model: nn.Module, batches: Batches, temperature: float | None = None) -> dict[str, Any]:
    """``accuracy`` and ``eval_images`` (as :func:`accuracy`) and what accuracy hides, from
    the same pass: ``macro_f1``, ``worst_class_recall``, ``ece`` and ``nll``
    (:func:`effray.metrics.classification_metrics`), and the temperature fitted on these
    logits (or the recorded ``temperature``, applied to new rows) with the ``ece_scaled``
    and ``nll_scaled`` it gives (:func:`effray.metrics.scaled_calibration`). The logits stay
    on the model's device until the pass ends, then go to the host once."""
    m = scored(model, batches, keep_logits=True)
    if not m["count"]:
        return {"accuracy": float("nan"), "eval_images": 0}
    names = [str(i) for i in range(m["logits"].shape[1])]
    c = classification_metrics(m["logits"], m["labels"], names)
    return {
        "accuracy": m["accuracy"],
        "eval_images": m["count"],
        **{k: c[k] for k in ("macro_f1", "worst_class_recall", "ece", "nll")},
        **scaled_calibration(m["logits"], m["labels"], names, temperature),
    }


def measure(
    model: nn.Module,
    batches: Batches | None = None,
    *,
    artifact: str | os.PathLike | None = None,
    int8_model: nn.Module | None = None,
    teacher: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    latency_batches: tuple[int, ...] = (1, 256),
    repeats: dict[int, int] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One metrics dict: ``accuracy`` and :func:`class_scores` (when ``batches``), ``params``, ``nonzero_params``,
    ``macs``, ``sparse_macs``, ``bytes`` (the file at ``artifact``), ``latency_ms_b{N}``
    for each batch size at ``threads`` threads, the same for ``int8_model`` (``int8_*``),
    and ``vs_teacher`` ratios when given the teacher's own ``measure`` dict.

    A fake-quantized model is timed as its float twin (same weights, plain layers): fake
    quantization is a training device, its overhead is not the deployed model's."""
    batches = list(batches) if batches is not None else None
    if input_shape is None and batches:  # the size the model is scored at (a ViT takes no other)
        input_shape = tuple(batches[0][0].shape[1:])
    out: dict[str, Any] = {"params": parameter_count(model), "nonzero_params": nonzero_parameters(model)}
    out.update(count_macs(model, input_shape))
    if batches is not None:
        out.update(class_scores(model, batches))
    if artifact is not None:
        path = os.path.join(artifact, "model.pt") if os.path.isdir(artifact) else artifact
        out["bytes"] = os.path.getsize(path)
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    repeats = {1: 30, **(repeats or {})}
    try:
        timed = [dequantize(model) if is_quantized(model) else model] + ([int8_model] if int8_model is not None else [])
        for b in latency_batches:
            ms = latency_ms(*timed, batch_size=b, input_shape=input_shape, repeats=repeats.get(b, 5))
            out[f"latency_ms_b{b}"] = ms[0]
            if int8_model is not None:
                out[f"int8_latency_ms_b{b}"] = ms[1]
                out[f"int8_speedup_b{b}"] = ms[0] / ms[1]
        if int8_model is not None and batches is not None:
            out["int8_accuracy"], _ = accuracy(int8_model, batches)
    finally:
        torch.set_num_threads(previous)
    out["threads"] = threads
    if teacher is not None:
        out["vs_teacher"] = compare(out, teacher)
    return out


def compare(m: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """Ratios to the teacher (> 1 = better: smaller, cheaper, faster) and the accuracy drop
    in points (positive = worse). The size ratio is against the teacher's fp32 artifact."""
    out: dict[str, float] = {}

    def ratio(key: str, name: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        if a.get(key) and b.get(key):
            out[name] = float(b[key]) / float(a[key])

    ratio("bytes", "size_ratio", m, teacher)
    ratio("params", "params_ratio", m, teacher)
    ratio("nonzero_params", "nonzero_params_ratio", m, teacher)
    ratio("macs", "macs_ratio", m, teacher)
    ratio("sparse_macs", "sparse_macs_ratio", m, teacher)
    for k in [k for k in m if k.startswith("latency_ms_b")]:
        ratio(k, "speedup_" + k.removeprefix("latency_ms_"), m, teacher)
        if f"int8_{k}" in m and teacher.get(k):
            out["int8_speedup_" + k.removeprefix("latency_ms_")] = float(teacher[k]) / float(m[f"int8_{k}"])
    for key in (
        "accuracy",
        "macro_f1",
        "worst_class_recall",
        "corruption_accuracy",
    ):  # what compression costs, in points
        if m.get(key) is not None and teacher.get(key) is not None:
            out[f"{key}_drop_points"] = 100.0 * (float(teacher[key]) - float(m[key]))
    if m.get("ece") is not None and teacher.get("ece") is not None:
        out["ece_increase_points"] = 100.0 * (float(m["ece"]) - float(teacher["ece"]))
    return out
