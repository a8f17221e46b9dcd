"""Quantizing a model (QAT and PTQ), BN folding, and the float copy of a quantized model.

Unlike ``torch.ao``'s eager flow nothing is skipped: every ``Conv2d`` and ``Linear`` is
replaced by its fake-quant twin (:mod:`effray.compress.fakequant`: same parameter names,
so optimizers and state dicts keep working); the first conv and the classifier take
their own bit widths.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from effray.compress.config import valid_bits
from effray.compress.fakequant import (
    OFF,
    QUANT_TYPES,
    ActQuant,
    WeightQuant,
    bn_factor,
    fp16_round,
    layer_args,
    make_layer,
)
from effray.compress.layers import classifier, model_device
from effray.config import require
from effray.registry import Registry

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANT_TYPES) for m in model.modules())


def quantizable(m: nn.Module) -> bool:
    """A conv or linear whose forward is torch's own: its fake-quant twin computes the same.
    A library's subclass with a forward of its own (timm's ``Conv2dSame``, ``StdConv2d``)
    would lose it, so it stays float (:func:`kept_float` names them)."""
    return isinstance(m, QUANT_TYPES) or (
        isinstance(m, (nn.Conv2d, nn.Linear)) and type(m).forward in (nn.Conv2d.forward, nn.Linear.forward)
    )


def kept_float(model: nn.Module) -> list[str]:
    """Convs and linears :func:`quantize_model` leaves in float, with their class: the one-line
    reason a model's report gives for what it could not quantize."""
    return [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not quantizable(m)
    ]


def bits_per_layer(model: nn.Module) -> dict[str, int]:
    """Weight bits of every conv and linear (32 = float): the artifact's "bits per layer"."""
    return {n: getattr(m, "bits", OFF) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def edge_layers(model: nn.Module) -> tuple[str | None, str | None]:
    """The names of the first quantizable layer and of the classifier (when it is a quantizable
    linear): they quantize their input as well, with ``first_bits``/``last_bits``."""
    layers = [(n, m) for n, m in model.named_modules() if quantizable(m)]
    if not layers:
        return None, None
    out = classifier(model) if any(isinstance(m, nn.Linear) for _, m in layers) else None
    return layers[0][0], next((n for n, m in layers if m is out), None)


def weight_bits(
    model: nn.Module, bits: int, *, first_bits: int = 8, last_bits: int = 8, layer_bits: dict[str, int] | None = None
) -> dict[str, int]:
    """Each quantizable layer's weight bits as :func:`quantize_model` sets them (32 = float)."""
    first, last = edge_layers(model)
    own = layer_bits or {}
    return {
        n: own.get(n, first_bits if n == first else last_bits if n == last else bits)
        for n, m in model.named_modules()
        if quantizable(m)
    }


def quantize_model(
    model: nn.Module,
    bits: int,
    *,
    act_bits: int = 8,
    first_bits: int = 8,
    last_bits: int = 8,
    act_range: str = "ema",
    learn: bool = True,
    layer_bits: dict[str, int] | None = None,
    simulate_bn: dict[str, str] | None = None,
) -> nn.Module:
    """Replace every Conv2d/Linear of ``model`` (in place; also returned) by its fake-quant
    twin. The first layer and the classifier get ``first_bits``/``last_bits`` for weights
    and input; ``act_bits=32`` leaves every activation in float. Parameters are shared,
    not copied, so an optimizer built before still updates them (rebuild it anyway to
    add the new step-size parameters). ``layer_bits`` gives named layers their own weight
    bits (32 = float), first and last included (their inputs keep ``first_bits``/``last_bits``:
    a per-layer weight width never quantizes the image); a name the model lacks is an error.
    ``simulate_bn`` (layer -> the BatchNorm it feeds, :func:`bn_pairs`): those layers simulate
    the BN's fold (QAT keeps the normalisation; :func:`fold_linked` folds at the end)."""

    for flag, b in (("bits", bits), ("act_bits", act_bits), ("first_bits", first_bits), ("last_bits", last_bits)):
        require(valid_bits(b), f"{flag} must be 2..8 (or 32 = off), got {b}")
    layers = [(n, m) for n, m in model.named_modules() if quantizable(m)]
    require(bool(layers), "nothing to quantize: the model has no conv or linear layer with torch's own forward")
    require(not is_quantized(model), "model is already quantized")
    own = dict(layer_bits or {})
    for name, b in own.items():
        require(valid_bits(b), f"layer_bits[{name!r}] must be 2..8 (or 32 = off), got {b}")
    unknown = sorted(set(own) - {n for n, _ in layers})
    require(not unknown, f"per-layer bits name layers this model has no quantizable conv/linear for: {unknown[:5]}")
    first, last = edge_layers(model)
    w_bits_of = weight_bits(model, bits, first_bits=first_bits, last_bits=last_bits, layer_bits=own)
    for name, m in layers:
        edge = first_bits if name == first else last_bits if name == last else None  # their input takes these too
        w_bits = w_bits_of[name]
        a_bits = OFF if act_bits == OFF else act_bits if edge is None else edge
        if w_bits == OFF:
            continue
        with torch.device(m.weight.device):  # quantizer parameters and buffers beside the weights
            q = make_layer(
                "conv" if isinstance(m, nn.Conv2d) else "linear", layer_args(m), w_bits, a_bits, act_range, learn
            )
        q.weight, q.bias = m.weight, m.bias
        if name in (simulate_bn or {}):
            q.link_bn(model.get_submodule(simulate_bn[name]))
        set_module(model, name, q.train(m.training))
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Batches, max_batches: int = 8) -> nn.Module:
    """Set weight step sizes (MSE search) and activation ranges from a few batches, in eval
    mode (BN running stats untouched). Inputs pass unquantized while ranges are observed,
    as PTQ calibration does; afterwards every quantizer is ready."""
    was = model.training
    model.eval()
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    for m in model.modules():
        if isinstance(m, QUANT_TYPES):
            m.wq.init_from(m.folded_weight())
    for a in acts:
        a.calibrating = True
        a.seen.fill_(False)
    device = model_device(model)
    n = 0
    try:
        for x, *_ in batches:
            model(x.to(device, non_blocking=True))
            n += 1
            if n >= max_batches:
                break
    finally:
        for a in acts:
            a.calibrating = False
    require(n > 0, "calibration needs at least one batch")
    for a in acts:
        a.set_range()
    return model.train(was)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, max_batches: int | None = None) -> nn.Module:
    """Every BatchNorm's running statistics re-estimated on ``batches`` (the first
    ``max_batches``; their plain mean, the rest of the model in eval mode), in place. A
    changed layer shifts the statistics the layers after it normalise with (a sensitivity
    probe), and before QAT simulates the folds the step sizes are set on weights scaled by
    these statistics, which may be stale (channels pruned upstream, a teacher never trained
    on this data)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    was, momenta = model.training, [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    device, n = model_device(model), 0
    try:
        for x, *_ in batches:
            for m in bns:  # a cumulative mean, counted here: momentum None would read BN's counter back to the host
                m.momentum = 1.0 / (n + 1)
            model(x.to(device, non_blocking=True))
            n += 1
            if max_batches is not None and n >= max_batches:
                break
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was)
    require(n > 0, "re-estimating BatchNorm statistics needs at least one batch")
    return model


def freeze(model: nn.Module) -> nn.Module:
    """PTQ: step sizes and ranges stop changing (no gradient, no EMA)."""
    for m in model.modules():
        if isinstance(m, (WeightQuant, ActQuant)):
            m.scale.requires_grad_(False)
        if isinstance(m, ActQuant):
            m.frozen = True
    return model


# name -> (model, batches, **bit options) -> quantized model, ready to fine-tune (qat) or use (ptq)
QUANTIZERS: Registry[Callable[..., nn.Module]] = Registry("quantizer")


@QUANTIZERS.register("qat")
def quantize_qat(model: nn.Module, batches: Batches, *, calib_batches: int = 8, **bits: Any) -> nn.Module:
    """Fake-quant with learnable step sizes, calibrated first so training starts sane."""
    return calibrate(quantize_model(model, learn=True, **bits), batches, calib_batches)


@QUANTIZERS.register("ptq")
def quantize_ptq(model: nn.Module, batches: Batches, *, calib_batches: int = 8, **bits: Any) -> nn.Module:
    """Post-training quantization: calibrate on ``batches``, then freeze."""
    return freeze(calibrate(quantize_model(model, learn=False, **bits), batches, calib_batches))


def bn_pairs(model: nn.Module) -> dict[str, str]:
    """Every BatchNorm fed directly (and only) by a quantizable conv/linear: ``{layer: bn}``.
    Found by tracing the real dataflow (torch.fx), not module order: in fastnet a max-pool
    sits between conv and BN, and that BN stays (folding across the pool is only valid for
    a positive BN scale). An untraceable model has none (said once, in the log)."""
    import torch.fx

    if not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules()):
        return {}  # nothing to fold (a ViT): no trace needed
    was = model.training
    model.eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow, untraceable ops
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        log.warning("BatchNorm not folded: torch.fx can't trace %s (%s); it stays a layer", type(model).__name__, first)
        return {}
    finally:
        model.train(was)
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        # exactly BatchNorm: a subclass (timm's BatchNormAct2d) does more than normalise
        if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        src = node.args[0]
        layer = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if layer is not None and quantizable(layer) and len(src.users) == 1:
            pairs[str(src.target)] = str(node.target)
    return pairs


@torch.no_grad()
def _fold_into(model: nn.Module, name: str, layer: nn.Module, bn: nn.Module, a: torch.Tensor) -> None:
    """Fold ``bn`` (factor ``a``) into ``layer``'s weight and bias; the BN becomes ``nn.Identity``."""
    shift = (bn.bias if bn.affine else torch.zeros_like(a)) - bn.running_mean * a
    bias = shift if layer.bias is None else layer.bias * a + shift
    layer.weight.mul_(a.view((-1,) + (1,) * (layer.weight.dim() - 1)))
    layer.bias = nn.Parameter(bias.detach().clone())
    set_module(model, name, nn.Identity())


@torch.no_grad()
def fold_bn(model: nn.Module, pairs: dict[str, str] | None = None) -> nn.Module:
    """Fold every BatchNorm of :func:`bn_pairs` (or of ``pairs``, found already) into its layer, in place.

    Done before PTQ (and before QAT with ``--qat-bn fold``), so the k-bit weights are the
    deployed ones and the artifact needs no BN statistics."""
    if is_quantized(model):
        raise ValueError("fold_bn must run before quantize_model")
    for layer, bn in (bn_pairs(model) if pairs is None else pairs).items():
        m = model.get_submodule(bn)
        _fold_into(model, bn, model.get_submodule(layer), m, bn_factor(m))
    return model


def has_linked_bn(model: nn.Module) -> bool:
    """Whether a layer of ``model`` still simulates a BN's fold (mid-QAT)."""
    return any(isinstance(m, QUANT_TYPES) and m.linked_bn is not None for m in model.modules())


@torch.no_grad()
def fold_linked(model: nn.Module) -> nn.Module:
    """Fold every BN whose fold a quantized layer simulates (in place), with the statistics
    the BN holds now: the weight takes the BN's factor, and each channel's step size the
    factor's change since the link, so the codes stay and in eval mode the outputs are
    what they were (up to the fp16 rounding of the new step sizes)."""
    names = {id(m): n for n, m in model.named_modules()}
    for m in list(model.modules()):
        if isinstance(m, QUANT_TYPES) and m.linked_bn is not None:
            bn, a = m.linked_bn, bn_factor(m.linked_bn)
            m.wq.scale.mul_(a / m.bn_scale)  # weight x a over step x (a / bn_scale): the codes of the link's scaling
            _fold_into(model, names[id(bn)], m, bn, a)
            m.link_bn(None)
    return model


class FixedActQuant(nn.Module):
    """A calibrated :class:`ActQuant` as plain ops on constant buffers (divide, clamp,
    round, multiply: FakeQuant's forward, in its order), so a model keeps computing exactly
    what it computed where an autograd Function can't go (``torch.export``, ONNX)."""

    def __init__(self, aq: ActQuant) -> None:
        super().__init__()
        require(aq.is_ready, "an uncalibrated activation quantizer has no range to fix; calibrate the model first")
        self.register_buffer("scale", aq.scale.detach().abs().clamp_min(1e-8).clone())
        self.register_buffer("qmin", (-aq.zero).detach().clone())
        self.register_buffer("qmax", ((2**aq.bits - 1) - aq.zero).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.scale).clamp(self.qmin, self.qmax).round() * self.scale


@torch.no_grad()
def dequantize(model: nn.Module, keep_activations: bool = False) -> nn.Module:
    """A float copy: each QConv2d/QLinear becomes a plain layer holding its fake-quant
    weight (and fp16 bias). Activation quantizers are dropped (the float twin the int8
    runtime converts, calibrating its own activation ranges), or with ``keep_activations``
    kept as :class:`FixedActQuant` in front of the layer: then the copy computes exactly
    what ``model`` does, which is what ``effray export`` writes as the fp32 program."""
    out = fold_linked(copy.deepcopy(model))
    for name, m in list(out.named_modules()):
        if isinstance(m, QUANT_TYPES):
            plain = make_layer("conv" if isinstance(m, nn.Conv2d) else "linear", layer_args(m))
            plain.weight.copy_(m.qweight())
            if m.bias is not None:
                plain.bias.copy_(fp16_round(m.bias))
            plain.train(m.training)
            if keep_activations and isinstance(m.aq, ActQuant):
                plain = nn.Sequential(FixedActQuant(m.aq), plain)
            set_module(out, name, plain)
    return out
