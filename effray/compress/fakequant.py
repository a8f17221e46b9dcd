"""k-bit fake quantization: the quantizers and the conv/linear layers that carry them.

Weights: per-output-channel symmetric, codes in [-(2^(k-1)-1), 2^(k-1)-1], a learned
(LSQ, Esser et al. 2020) step size per channel, initialised by an MSE search over clip
ratios (plain max-abs wastes most levels at 2-4 bits). Activations (each layer's input):
affine with an integer zero point, the range calibrated as a running min/max (``ema``) or
the step size learned (``lsq``). Both go through one autograd function whose forward is
exactly ``clamp(round(x / s), qmin, qmax) * s`` with ``s`` rounded to fp16, so the packed
artifact (integer codes + fp16 scales) dequantizes to bit-identical weights.
:mod:`effray.compress.quantize` puts these layers into a model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
    per-channel update overshoots it (a small first conv most), costing accuracy that
    frozen 8-bit steps keep."""

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


def bn_factor(bn: nn.Module) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)``: what folding ``bn`` multiplies its layer's output
    channels by (never exactly 0: a simulated fold divides by it)."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    a = gamma / torch.sqrt(bn.running_var + bn.eps)
    return torch.where(a == 0, torch.full_like(a, MIN_SCALE), a)


def _per_channel(t: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return t.view(shape)


class _QMixin:
    """The shared half of QConv2d/QLinear: quantizers as children, fp16 bias, and the
    simulated BN fold of QAT.

    Folding the BN that follows a layer before QAT makes the codes the deployed weights',
    but the net then trains without normalisation (a folded ResNet-18 diverges at LRs its BN
    version takes). With a BN linked (:meth:`link_bn`), the layer quantizes its weight
    *scaled* by the BN's factor, as the folded layer will hold it, and divides the factor
    back out of its output, so the BN that follows still normalises (batch statistics in
    training, running ones in eval; Jacob et al. 2018, torch.ao's fused QAT). The factor is
    the one of the link (``bn_scale``, a buffer): the running statistics keep moving while
    QAT trains, and a factor that moved with them would move the quantization grid under
    the weights every step. In eval mode the pair computes what the folded layer does (up
    to fp16 roundings); :func:`effray.compress.quantize.fold_linked` folds it for real with
    the statistics it ends with: the codes stay, and each channel's step size takes the
    factor's change since the link."""

    bits: int
    act_bits: int
    wq: WeightQuant
    aq: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self, *args: Any, bits: int, act_bits: int, act_range: str = "ema", learn: bool = True, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)  # the layer itself (next in the MRO), then its quantizers
        self.bits, self.act_bits = bits, act_bits
        self.wq = WeightQuant(bits, self.weight.shape[0], learn=learn)
        self.aq = ActQuant(act_bits, act_range) if act_bits != OFF else nn.Identity()
        self._bn: tuple[nn.Module, ...] = ()  # a tuple, not a child: the BN stays where the model has it

    @property
    def linked_bn(self) -> nn.Module | None:
        """The BatchNorm whose fold this layer simulates, or None."""
        return self._bn[0] if self._bn else None

    def link_bn(self, bn: nn.Module | None) -> None:
        """Simulate ``bn``'s fold with its factor as it is now (None: unlink)."""
        self._bn = () if bn is None else (bn,)
        if bn is None:
            self._buffers.pop("bn_scale", None)
        else:
            self.register_buffer("bn_scale", bn_factor(bn).detach().clone())

    def folded_weight(self) -> torch.Tensor:
        """The float weight as the folded layer holds it: what the step sizes quantize."""
        if not self._bn:
            return self.weight
        return self.weight * _per_channel(self.bn_scale, self.weight, 0)

    def qweight(self) -> torch.Tensor:
        return self.wq(self.folded_weight())

    def qbias(self) -> torch.Tensor | None:
        b = self.bias
        return None if b is None else b + (fp16_round(b) - b).detach()

    def _output(self, compute: Any, x: torch.Tensor) -> torch.Tensor:
        if not self._bn:
            return compute(self.aq(x), self.qweight(), self.qbias())
        y = compute(self.aq(x), self.qweight(), None)
        y = y / _per_channel(self.bn_scale, y, 1)
        return y if self.bias is None else y + _per_channel(self.bias, y, 1)


class QConv2d(_QMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input are fake-quantized in every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(self._conv_forward, x)


class QLinear(_QMixin, nn.Linear):
    """``nn.Linear`` whose weight and input are fake-quantized in every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(nn.functional.linear, x)


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
