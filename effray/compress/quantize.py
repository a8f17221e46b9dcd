"""k-bit fake quantization (QAT and PTQ) of every conv and linear layer, and BN folding.

Weights: per-output-channel symmetric, codes in [-(2^(k-1)-1), 2^(k-1)-1], a learned
(LSQ, Esser et al. 2020) step size per channel, initialised by an MSE search over clip
ratios (plain max-abs wastes most levels at 2-4 bits). Activations (each layer's input):
affine with an integer zero point, the range calibrated as a running min/max (``ema``) or
the step size learned (``lsq``). Both go through one autograd function whose forward is
exactly ``clamp(round(x / s), qmin, qmax) * s`` with ``s`` rounded to fp16, so the packed
artifact (integer codes + fp16 scales) dequantizes to bit-identical weights.

Unlike ``torch.ao``'s eager flow nothing is skipped: every ``Conv2d`` and ``Linear`` is
replaced by :class:`QConv2d` / :class:`QLinear` (same parameter names, so optimizers and
state dicts keep working); the first conv and the classifier take their own bit widths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from effray.compress.config import valid_bits
from effray.compress.layers import classifier, model_device
from effray.config import require
from effray.registry import Registry

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
OFF = 32
MIN_SCALE = 2.0**-20  # keeps fp16-rounded scales non-zero


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


class FakeQuant(torch.autograd.Function):
    """``clamp(round(x / s), qmin, qmax) * s`` with LSQ gradients.

    dx: straight-through inside the clip range, zero outside. ds: LSQ's
    ``(round(v) - v)`` inside, the clip bound outside, scaled by ``g`` (1/sqrt(n * qmax))
    so the step size learns at the weights' pace. ``s`` arrives already fp16-rounded."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor, qmin: Any, qmax: Any, g: Any) -> torch.Tensor:
        # qmin/qmax/g: Python numbers, or 0-dim tensors on x's device (an activation's
        # zero point), so nothing here reads a value back to the host
        v = x / s
        q = v.clamp(qmin, qmax).round()
        ctx.save_for_backward(v, q, s)
        ctx.bounds, ctx.g = (qmin, qmax), g
        return q * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        v, q, s = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        inside = (v >= qmin) & (v <= qmax)
        gx = grad * inside
        gs = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, q - v, q) * grad * ctx.g
            dims = [d for d in range(ds.dim()) if d >= s.dim() or s.shape[d] == 1]
            gs = ds.sum(dim=dims, keepdim=True).view_as(s) if dims else ds
        return gx, gs, None, None, None


LEARNED_STEP_BELOW = 8  # weight step sizes are learned (LSQ) only at fewer bits than this


class WeightQuant(nn.Module):
    """Per-output-channel symmetric k-bit weights; ``scale`` learned (LSQ) below
    :data:`LEARNED_STEP_BELOW` bits unless frozen (PTQ).

    At 8 bits the MSE-initialised step is already within the weights' own noise, and LSQ's
    per-channel update overshoots: fine-tuning a converged convnet at LR 0.01, its 8-bit
    layers' step sizes grew 6-13x in 20 steps (a 27-weight first conv most) and accuracy
    fell from 73 % to 30 %; with them frozen the same epoch kept 71 % (teacher 71.6 %)."""

    def __init__(self, bits: int, channels: int, learn: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=learn and bits < LEARNED_STEP_BELOW)
        _ready_flag(self)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (w.dim() - 1)

    def used_scale(self) -> torch.Tensor:
        """The step sizes the forward uses (and the artifact stores): |scale| in fp16."""
        return fp16_round(self.scale.abs().clamp_min(MIN_SCALE))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Per channel, the clip ratio (of max |w|) with the least squared error."""
        amax = w.abs().flatten(1).amax(dim=1).clamp_min(MIN_SCALE)
        best, best_err = amax / self.qmax, torch.full_like(amax, float("inf"))
        for ratio in (0.3 + 0.05 * i for i in range(15)):  # 0.3 .. 1.0, as Python numbers
            s = fp16_round((amax * ratio / self.qmax).clamp_min(MIN_SCALE))
            err = (
                (FakeQuant.apply(w, s.view(self._shape(w)), -self.qmax, self.qmax, 1.0) - w).square().flatten(1).sum(1)
            )
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
        self.scale.copy_(best)
        _mark_ready(self)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.is_ready:
            self.init_from(w.detach())
        g = 1.0 / (w[0].numel() * self.qmax) ** 0.5
        s = self.scale.abs().clamp_min(MIN_SCALE)
        s = s + (fp16_round(s) - s).detach()  # exact: s and its fp16 rounding are within 2x
        return FakeQuant.apply(w, s.view(self._shape(w)), -self.qmax, self.qmax, g)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (int8) of ``w``: ``codes * used_scale`` is the forward's weight."""
        s = self.used_scale().view(self._shape(w))
        return (w / s).clamp(-self.qmax, self.qmax).round().to(torch.int8)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActQuant(nn.Module):
    """k-bit affine activation quantizer: ``[qmin, qmax] = [-zero, 2^k - 1 - zero]``.

    Ranges come from a running min/max over calibration batches; in ``ema`` mode they keep
    tracking the data while training, in ``lsq`` mode the step size is learned instead.
    The zero point is an integer, so the range always contains an exact 0 (ReLU outputs
    and zero padding stay exact) and post-ReLU inputs use all 2^k levels."""

    def __init__(self, bits: int, mode: str = "ema", momentum: float = 0.1) -> None:
        super().__init__()
        self.bits, self.mode, self.momentum = bits, mode, momentum
        self.calibrating, self.frozen = False, False
        self.scale = nn.Parameter(torch.ones(()), requires_grad=mode == "lsq")
        self.register_buffer("zero", torch.zeros(()))
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
        _ready_flag(self)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold this batch's range into the running one: the first batch since ``seen`` was
        cleared sets it, later ones move it by ``momentum`` (all on the device)."""
        lo, hi = x.min().float().clamp_max(0.0), x.max().float().clamp_min(0.0)
        self.lo.copy_(torch.where(self.seen, self.lo.lerp(lo, self.momentum), lo))
        self.hi.copy_(torch.where(self.seen, self.hi.lerp(hi, self.momentum), hi))
        self.seen.fill_(True)

    @torch.no_grad()
    def set_range(self) -> None:
        levels = 2**self.bits - 1
        s = (self.hi - self.lo).clamp_min(1e-8) / levels
        self.zero.copy_(torch.round(-self.lo / s))
        self.scale.copy_(s)
        _mark_ready(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.is_ready or (self.mode == "ema" and self.training and not self.frozen):
            self.observe(x)
            self.set_range()
        # the zero point stays a device tensor: float(self.zero) would be a host sync per forward
        qmin, qmax = -self.zero, (2**self.bits - 1) - self.zero
        s = self.scale.abs().clamp_min(1e-8)
        g = (x[0].numel() * qmax.clamp_min(1.0)).rsqrt()
        return FakeQuant.apply(x, s, qmin, qmax, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"


def _ready_flag(module: nn.Module) -> None:
    """A quantizer's "calibrated" state, twice: the ``ready`` buffer that checkpoints and
    artifacts carry, and a Python mirror the forward reads (reading the buffer there would
    be a host sync per forward). Loading a state dict refreshes the mirror once."""
    module.register_buffer("ready", torch.zeros((), dtype=torch.bool))
    module.is_ready = False

    def refresh(mod: nn.Module, _: Any) -> None:
        mod.is_ready = bool(mod.ready)

    module.register_load_state_dict_post_hook(refresh)


def _mark_ready(module: nn.Module) -> None:
    module.ready.fill_(True)
    module.is_ready = True


class _QMixin:
    """The shared half of QConv2d/QLinear: quantizers as children, fp16 bias."""

    bits: int
    act_bits: int
    wq: WeightQuant
    aq: nn.Module

    def _attach(self, bits: int, act_bits: int, act_range: str, learn: bool) -> None:
        self.bits, self.act_bits = bits, act_bits
        self.wq = WeightQuant(bits, self.weight.shape[0], learn=learn)  # type: ignore[attr-defined]
        self.aq = ActQuant(act_bits, act_range) if act_bits != OFF else nn.Identity()

    def qweight(self) -> torch.Tensor:
        return self.wq(self.weight)  # type: ignore[attr-defined]

    def qbias(self) -> torch.Tensor | None:
        b = self.bias  # type: ignore[attr-defined]
        return None if b is None else b + (fp16_round(b) - b).detach()


class QConv2d(_QMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input are fake-quantized in every forward."""

    def __init__(
        self, *args: Any, bits: int, act_bits: int, act_range: str = "ema", learn: bool = True, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self._attach(bits, act_bits, act_range, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.aq(x), self.qweight(), self.qbias())


class QLinear(_QMixin, nn.Linear):
    """``nn.Linear`` whose weight and input are fake-quantized in every forward."""

    def __init__(
        self, *args: Any, bits: int, act_bits: int, act_range: str = "ema", learn: bool = True, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self._attach(bits, act_bits, act_range, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.aq(x), self.qweight(), self.qbias())


QUANT_TYPES = (QConv2d, QLinear)


def layer_args(m: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a conv/linear: enough to rebuild it at its (pruned) shape."""
    if isinstance(m, nn.Conv2d):
        return {
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
            "dilation": list(m.dilation),
            "groups": m.groups,
            "bias": m.bias is not None,
        }
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def make_layer(
    kind: str, args: dict[str, Any], bits: int = OFF, act_bits: int = OFF, act_range: str = "ema", learn: bool = True
) -> nn.Module:
    """A conv/linear (quantized when ``bits`` < 32) from :func:`layer_args` output."""
    conv = kind == "conv"
    if bits == OFF:
        return (nn.Conv2d if conv else nn.Linear)(**args)
    cls = QConv2d if conv else QLinear
    return cls(**args, bits=bits, act_bits=act_bits, act_range=act_range, learn=learn)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANT_TYPES) for m in model.modules())


def bits_per_layer(model: nn.Module) -> dict[str, int]:
    """Weight bits of every conv and linear (32 = float): the artifact's "bits per layer"."""
    return {n: getattr(m, "bits", OFF) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def quantize_model(
    model: nn.Module,
    bits: int,
    *,
    act_bits: int = 8,
    first_bits: int = 8,
    last_bits: int = 8,
    act_range: str = "ema",
    learn: bool = True,
) -> nn.Module:
    """Replace every Conv2d/Linear of ``model`` (in place; also returned) by its fake-quant
    twin. The first layer and the classifier get ``first_bits``/``last_bits`` for weights
    and input; ``act_bits=32`` leaves every activation in float. Parameters are shared,
    not copied, so an optimizer built before still updates them (rebuild it anyway to
    add the new step-size parameters)."""

    for flag, b in (("bits", bits), ("act_bits", act_bits), ("first_bits", first_bits), ("last_bits", last_bits)):
        require(valid_bits(b), f"{flag} must be 2..8 (or 32 = off), got {b}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    require(bool(layers), "nothing to quantize: the model has no conv or linear layer")
    require(not is_quantized(model), "model is already quantized")
    last = classifier(model) if any(isinstance(m, nn.Linear) for _, m in layers) else None
    for i, (name, m) in enumerate(layers):
        w_bits = first_bits if i == 0 else last_bits if m is last else bits
        a_bits = OFF if act_bits == OFF else w_bits if (i == 0 or m is last) else act_bits
        if w_bits == OFF:
            continue
        with torch.device(m.weight.device):  # quantizer parameters and buffers beside the weights
            q = make_layer(
                "conv" if isinstance(m, nn.Conv2d) else "linear", layer_args(m), w_bits, a_bits, act_range, learn
            )
        q.weight, q.bias = m.weight, m.bias
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
            m.wq.init_from(m.weight)
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


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm fed directly (and only) by a conv/linear into that layer, in
    place; the BN becomes ``nn.Identity``. Found by tracing the real dataflow (torch.fx),
    not module order: in fastnet a max-pool sits between conv and BN, and that BN stays
    (folding across the pool is only valid for a positive BN scale).

    Done before quantizing, so the k-bit weights are the deployed ones and the artifact
    needs no BN statistics."""
    import torch.fx

    if is_quantized(model):
        raise ValueError("fold_bn must run before quantize_model")
    was = model.training
    model.eval()
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.track_running_stats:
            continue
        src = node.args[0]
        layer = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or len(src.users) != 1:
            continue
        a = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(a)) - bn.running_mean * a
        bias = shift if layer.bias is None else layer.bias * a + shift
        layer.weight.mul_(a.view((-1,) + (1,) * (layer.weight.dim() - 1)))
        layer.bias = nn.Parameter(bias.detach().clone())
        set_module(model, node.target, nn.Identity())
    return model.train(was)


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
    out = copy.deepcopy(model)
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
