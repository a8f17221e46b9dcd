"""Per-layer bits and prune rates under a byte budget, from per-layer sensitivities.

``effray sensitivity`` measures what each setting costs each layer alone (its loss increase
on calibration images, no fine-tune). Here each layer gets one bit width and one
unstructured rate so that the summed predicted loss increase is smallest while the
packed layers cost no more bytes than the uniform config's: a multiple-choice knapsack,
solved up to a 1/4000 rounding of the budget by dynamic programming (a Lagrangian sweep,
``argmin drop + lambda * bytes`` per layer, reaches only the convex hull's points and can
land below what the uniform config itself scores).

A layer's bytes are those the artifact packs (:func:`effray.compress.pack.theory_bytes`:
k-bit codes or bitmap + non-zero codes, fp16 step sizes; bitmap + fp32 values when float),
additive across layers, counted on the teacher's own weights at each setting
(:class:`LayerBytes`): at 2 bits most small weights round to code 0 whatever the rate, and
a byte model that counted zeros from the rate alone priced every low-bit layer as if it
were dense. The file adds LZMA and metadata, so :func:`allocated` checks the
chosen config on the real file (:func:`effray.compress.cost.predict_costs`, the recipe's
own save path) against the uniform config's, tightening the layer budget until it fits.

A structured config is allocated in two steps: channel rates per coupled group within the
uniform config's MACs (:mod:`effray.compress.channels`), then bits per layer of the cut
model within its bytes, each layer priced on its cut weights. Bits never change MACs, so
the second step keeps the first's MACs; it trades the bytes the cuts freed (or cost) for
bits where the probes say they matter.

Two layers changed together are predicted to cost the sum of their drops, and so are a
layer's bits and its rate (the usual first-order assumption of NNI's and HAWQ's
allocators); the fine-tune that follows (QAT + KD) recovers much of either.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray.compress.channels import allocate_channels
from effray.compress.config import OFF, CompressConfig, format_layers
from effray.compress.cost import predict_costs, pruned_student
from effray.compress.fakequant import WeightQuant
from effray.compress.knapsack import Choice, allocate, interpolated
from effray.compress.layers import classifier
from effray.compress.pack import theory_bytes
from effray.compress.prune import lowest, prunable_layers
from effray.compress.quantize import edge_layers, quantizable, weight_bits
from effray.compress.steps import build_student
from effray.config import require
from effray.errors import EffrayError

log = logging.getLogger(__name__)

PARQUET = "sensitivity.parquet"
TRIES = 8  # tightenings of the layer budget before the uniform config is kept


def packed_bytes(weight: torch.Tensor, bits: int, nnz: int) -> int:
    """Packed bytes of a layer's ``weight`` with ``nnz`` non-zero codes (values when float)."""
    n = weight.numel()
    if bits == OFF:
        return min(4 * n, math.ceil(n / 8) + 4 * nnz)
    return theory_bytes(n, bits, weight.shape[0], nnz)


class LayerBytes:
    """Packed bytes of each layer of one model at each (bits, rate), from its own weights:
    the ``round(rate * n)`` smallest magnitudes zeroed (the recipe prunes first), then the
    k-bit codes of what is left with the step sizes QAT starts from, zeros counted (what
    the artifact packs sparse). Magnitude stands for every importance; the fine-tune moves
    the codes a little. Each setting is computed once."""

    def __init__(self, model: nn.Module) -> None:
        self.weights = {n: m.weight.detach().float().cpu() for n, m in prunable_layers(model)}
        self._memo: dict[tuple[str, int, float], int] = {}

    def __call__(self, name: str, bits: int, rate: float) -> int:
        key = (name, bits, rate)
        if key not in self._memo:
            self._memo[key] = self._count(name, bits, rate)
        return self._memo[key]

    @torch.no_grad()
    def _count(self, name: str, bits: int, rate: float) -> int:
        w = self.weights[name]
        pruned = w.flatten().masked_fill(lowest(w.abs().flatten(), int(round(rate * w.numel()))), 0.0).view_as(w)
        if bits == OFF:
            return packed_bytes(w, bits, int(pruned.count_nonzero()))
        quant = WeightQuant(bits, w.shape[0], learn=False)
        quant.init_from(pruned)
        return packed_bytes(w, bits, int(quant.codes(pruned).count_nonzero()))


def read_sensitivity(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``sensitivity.parquet`` (or of the one in directory ``path``)."""
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    p = p / PARQUET if p.is_dir() else p
    require(p.is_file(), f"--sensitivity {path}: no {PARQUET} there; run `effray sensitivity` on the teacher first")
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as exc:  # noqa: BLE001 - any unreadable file means the same to the user
        raise EffrayError(f"--sensitivity {p} is not a readable parquet file ({type(exc).__name__})") from None
    require(
        bool(rows) and {"layer", "kind", "value", "loss_increase"} <= set(rows[0]),
        f"--sensitivity {p} is not a table of `effray sensitivity` (layer, kind, value, loss_increase)",
    )
    return rows


def probed_drops(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[float, float]]]:
    """layer -> kind (``bits``/``unstructured``) -> value -> loss increase (negative noise
    counts as 0), skipped probes left out."""
    out: dict[str, dict[str, dict[float, float]]] = {}
    for r in rows:
        if r.get("loss_increase") is None or r["kind"] not in ("bits", "unstructured"):
            continue
        out.setdefault(r["layer"], {}).setdefault(r["kind"], {})[float(r["value"])] = max(0.0, r["loss_increase"])
    return out


def uniform_settings(model: nn.Module, cfg: CompressConfig) -> dict[str, tuple[int, float]]:
    """Each conv/linear's (bits, rate) under ``cfg`` as given: what :func:`quantize_model`
    and the pruner would set (the global pruner's rate stands for every layer but the
    classifier's)."""
    out_layer = classifier(model)
    bits = weight_bits(
        model, cfg.bits, first_bits=cfg.first_layer_bits, last_bits=cfg.last_layer_bits, layer_bits=cfg.bits_by_layer
    )
    named_rates = cfg.rates_by_layer
    return {
        name: (
            bits.get(name, OFF) if cfg.quantizes else OFF,
            named_rates.get(name, 0.0 if m is out_layer else cfg.prune_rate) if cfg.prunes else 0.0,
        )
        for name, m in prunable_layers(model)
    }


def layer_choices(
    model: nn.Module,
    cfg: CompressConfig,
    rows: list[dict[str, Any]],
    sizes: LayerBytes | None = None,
    strict: bool = True,
) -> dict[str, list[Choice]]:
    """Every layer's candidate settings: the probed bits (and float) when ``cfg`` quantizes,
    0 and the probed unstructured rates when it prunes, and the uniform config's own, each
    with its predicted drop and packed bytes (``sizes``, of ``model`` when not given). A
    layer the table never probed is an error, or with ``strict`` off keeps its own setting.

    The first quantizable layer and the classifier keep the bits the config gives them:
    they quantize their input too, a probe quantized their weights alone, and the summed
    probes missed what the two cost together (docs/results.md, "Per-layer allocation")."""
    sizes = sizes or LayerBytes(model)
    drops = probed_drops(rows)
    uniform = uniform_settings(model, cfg)
    missing = [n for n in uniform if n not in drops]
    if missing and strict:
        raise EffrayError(
            f"the sensitivity table has no probes of {len(missing)} layer(s) of this model (e.g. {missing[0]}); "
            "run `effray sensitivity` on a checkpoint of the architecture being compressed"
        )
    out = {}
    edges = set(edge_layers(model))
    for name, m in prunable_layers(model):
        probes = drops.get(name, {})
        bits_points = {float(OFF): 0.0, **probes.get("bits", {})}
        rate_points = {0.0: 0.0, **probes.get("unstructured", {})}
        own_bits, own_rate = uniform[name]
        # the edges keep their own bits, and so does a layer whose bits were never probed
        traded = own_bits != OFF and quantizable(m) and name not in edges and "bits" in probes
        bits_options = {own_bits} | ({int(b) for b in bits_points} if traded else set())
        rate_options = {own_rate} | (set(rate_points) if cfg.prunes else set())
        out[name] = [
            Choice(b, r, interpolated(bits_points, float(b)) + interpolated(rate_points, r), sizes(name, b, r))
            for b in sorted(bits_options)
            for r in sorted(rate_options)
        ]
    return out


def uniform_bytes(choices: dict[str, list[Choice]], model: nn.Module, cfg: CompressConfig) -> int:
    """The packed layer bytes of ``cfg``'s own (uniform) setting of every layer."""
    uniform = uniform_settings(model, cfg)
    return sum(next(c.cost for c in choices[n] if (c.bits, c.rate) == s) for n, s in uniform.items())


def as_config(cfg: CompressConfig, picked: dict[str, Choice], model: nn.Module) -> CompressConfig:
    """``cfg`` with the allocation as ``layer_bits`` (every quantizable layer, when it
    quantizes) and ``layer_rates`` (every layer, when it prunes)."""
    quantizing = {n for n, m in prunable_layers(model) if quantizable(m)}
    bits = {n: c.bits for n, c in picked.items() if n in quantizing} if cfg.quantizes else {}
    rates = {n: c.rate for n, c in picked.items()} if cfg.prunes else {}
    return dataclasses.replace(cfg, layer_bits=format_layers(bits), layer_rates=format_layers(rates))


def is_allocated(cfg: CompressConfig) -> bool:
    """Whether ``cfg`` still has a sensitivity allocation to make (not yet, and something to allocate)."""
    return cfg.allocation == "sensitivity" and not (cfg.layer_bits or cfg.layer_rates) and (cfg.quantizes or cfg.prunes)


class Allocator:
    """Sensitivity allocations against one teacher: each table read once and each layer's
    packed bytes per setting counted once, for a search that allocates every config it
    suggests. ``teacher_info`` and ``data`` are the artifact's metadata (its bytes too)."""

    def __init__(
        self, teacher: nn.Module, *, teacher_info: dict[str, Any] | None = None, data: dict[str, Any] | None = None
    ) -> None:
        self.teacher = teacher
        self.meta = {"teacher_info": teacher_info, "data": data}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._sizes: dict[tuple[Any, ...], LayerBytes] = {}  # per student: its layers' own weights
        self._predicted: dict[CompressConfig, dict[str, int]] = {}  # each config replayed once

    def _costs(self, cfg: CompressConfig) -> dict[str, int]:
        """:func:`~effray.compress.cost.predict_costs` of ``cfg``, each config once: the uniform
        config's MACs and bytes, and the channel allocation's, are read by both steps."""
        if cfg not in self._predicted:
            self._predicted[cfg] = predict_costs(self.teacher, cfg, **self.meta)
        return self._predicted[cfg]

    def __call__(self, cfg: CompressConfig) -> CompressConfig:
        """``cfg`` with ``--allocation sensitivity`` made concrete: per-layer bits and rates
        from ``cfg.sensitivity`` whose saved file is no larger than the uniform ``cfg``'s
        (both predicted on the recipe's own save path), or, pruning structured, per-layer
        channel rates whose MACs are no more than its (:mod:`effray.compress.channels`) and
        then bits per layer of the cut model within its bytes (:meth:`_bits_of_cut`);
        ``allocation: uniform`` when none fits (said in a warning). Any other config comes
        back as it is."""
        if not is_allocated(cfg):
            return cfg
        model = build_student(self.teacher, cfg)
        if cfg.sensitivity not in self._rows:
            self._rows[cfg.sensitivity] = read_sensitivity(cfg.sensitivity)
        rows = self._rows[cfg.sensitivity]
        if cfg.prunes and cfg.prune_kind == "structured":  # channels under the uniform config's MACs, then bits
            return self._bits_of_cut(cfg, allocate_channels(self.teacher, cfg, model, rows, self._costs), rows)
        target = self._costs(cfg)["bytes"]
        student = (cfg.student, cfg.student_width, cfg.student_weights, cfg.student_pretrained)
        if student not in self._sizes:  # unstructured only: a student's layers are those it is built with
            self._sizes[student] = LayerBytes(model)
        choices = layer_choices(model, cfg, rows, self._sizes[student])
        fitted = self._within_bytes(
            choices, uniform_bytes(choices, model, cfg), target, lambda p: as_config(cfg, p, model)
        )
        if fitted is None:
            log.warning(
                "no allocation from %s fits the uniform config's %d bytes in %d tries; the uniform config is kept",
                cfg.sensitivity,
                target,
                TRIES,
            )
            return dataclasses.replace(cfg, allocation="uniform")
        return fitted

    def _bits_of_cut(self, cfg: CompressConfig, cut: CompressConfig, rows: list[dict[str, Any]]) -> CompressConfig:
        """``cut`` (``cfg`` with channels allocated) with bits per layer chosen on the cut
        model's own layers (:func:`~effray.compress.cost.pruned_student`) so that its file is
        no larger than the uniform ``cfg``'s: the bytes the channel cuts
        freed buy bits where the probes say they matter, and a cut that costs more bytes
        than the uniform one pays for them in bits. Layers without bit probes keep their
        bits; without any (a table of channel probes only), or when no bits fit, ``cut``."""
        if cut.allocation != "sensitivity" or not cut.quantizes or not any(r["kind"] == "bits" for r in rows):
            return cut
        target = self._costs(cfg)["bytes"]
        bits_only = dataclasses.replace(cut, prune_rate=0.0, layer_rates="")
        pruned = pruned_student(self.teacher, cut, data=self.meta["data"])
        choices = layer_choices(pruned, bits_only, rows, strict=False)
        spent = uniform_bytes(choices, pruned, bits_only)
        size = self._costs(cut)["bytes"]

        def config(picked: dict[str, Choice]) -> CompressConfig:
            return dataclasses.replace(cut, layer_bits=as_config(bits_only, picked, pruned).layer_bits)

        fitted = self._within_bytes(choices, int(spent * target / size), target, config)
        if fitted is None:
            log.warning(
                "no bits per layer fit the cut model in the uniform config's %d bytes; bits stay uniform", target
            )
            return cut
        return fitted

    def _within_bytes(
        self,
        choices: dict[str, list[Choice]],
        budget: int,
        target: int,
        config: Callable[[dict[str, Choice]], CompressConfig],
    ) -> CompressConfig | None:
        """The knapsack's pick within ``budget`` layer bytes as a config (``config``) whose
        saved file is at most ``target`` bytes, the layer budget tightened by the file's
        overshoot (LZMA shrinks packed layers by a ratio of its own); None after TRIES."""
        for _ in range(TRIES):
            candidate = config(allocate(choices, budget))
            size = self._costs(candidate)["bytes"]
            if size <= target:
                return candidate
            budget = min(budget - 1, int(budget * target / size * 0.99))
        return None


def allocated(
    teacher: nn.Module,
    cfg: CompressConfig,
    *,
    teacher_info: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> CompressConfig:
    """One allocation (:class:`Allocator`) of ``cfg`` against ``teacher``."""
    return Allocator(teacher, teacher_info=teacher_info, data=data)(cfg)
