"""Pruning in three swappable parts: importance (who goes), schedule (how much, when) and
application (what "gone" means).

* ``IMPORTANCES``: ``l1``/``l2`` magnitude and ``taylor`` (|w * dL/dw|), each usable per
  weight (unstructured) and per channel group (structured, via Torch-Pruning).
* schedules (how much at each event): :mod:`effray.compress.schedule`.
* ``PRUNERS``: ``unstructured`` writes exact zeros into the weights (no masks, no
  ``torch.nn.utils.prune`` reparametrisation left behind); ``structured`` physically removes
  channels with Torch-Pruning's dependency graph, which couples the residual adds and 1x1
  projection shortcuts so a ResNet stays valid, parameters and MACs fall.

Between fine-tuning epochs call :func:`prune_step` with the schedule's rate; while
fine-tuning an unstructured model, :func:`lock_sparsity` keeps the zeros at zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effray.compress.layers import classifier, model_device
from effray.compress.quantize import is_quantized
from effray.compress.structure import attention_heads, check_forward, layer_name, referenced, set_heads, unsafe_layers
from effray.config import require
from effray.errors import EffrayError
from effray.models import build_model
from effray.registry import Registry

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
PRUNABLE = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------- importance


@dataclass(frozen=True)
class Importance:
    """A scoring rule at both granularities; higher score = keep."""

    element: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (weight, grad) -> scores
    group: Callable[[], Any]  # -> a torch_pruning importance for channel groups
    needs_grad: bool = False


IMPORTANCES: Registry[Importance] = Registry("pruning importance")


def torch_pruning() -> Any:
    """Torch-Pruning, imported when a structured step first needs it (heavy, and unused otherwise)."""
    import torch_pruning

    return torch_pruning


IMPORTANCES.register("l1")(
    Importance(lambda w, g: w.abs(), lambda: torch_pruning().importance.GroupMagnitudeImportance(p=1))
)
# element-wise l2 ranks like l1; it differs per group, where squares favour a few large weights
IMPORTANCES.register("l2")(
    Importance(lambda w, g: w.square(), lambda: torch_pruning().importance.GroupMagnitudeImportance(p=2))
)
IMPORTANCES.register("taylor")(
    Importance(lambda w, g: (w * g).abs(), lambda: torch_pruning().importance.GroupTaylorImportance(), needs_grad=True)
)


# ---------------------------------------------------------------- layer helpers


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer (quantized subclasses included), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all conv + linear weights (what the artifact really holds)."""
    layers = prunable_layers(model)
    if not layers:
        return 0.0
    total = sum(m.weight.numel() for _, m in layers)
    zeros = torch.stack([(m.weight == 0).sum() for _, m in layers]).sum()  # one host read, for reports
    return int(zeros) / max(total, 1)


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Each conv/linear's fraction of exact zeros (a host read per layer: for reports)."""
    return {n: round(float((m.weight == 0).float().mean()), 4) for n, m in prunable_layers(model)}


def channel_counts(model: nn.Module, skip: set[int] | None = None) -> list[int]:
    """Output channels/features of every prunable layer but the classifier (and ``skip``'s ids)."""
    out = classifier(model)
    return [m.weight.shape[0] for _, m in prunable_layers(model) if m is not out and id(m) not in (skip or set())]


def channel_rate_for_macs(mac_fraction: float) -> float:
    """Channel rate that removes about ``mac_fraction`` of a conv net's MACs: a conv's
    cost scales with in x out channels, so keeping a fraction k of channels keeps ~k^2."""
    require(0.0 <= mac_fraction < 1.0, f"MAC fraction must be in [0, 1), got {mac_fraction}")
    return 1.0 - (1.0 - mac_fraction) ** 0.5


def accumulate_grads(model: nn.Module, batches: Batches, max_batches: int = 4) -> None:
    """Fill ``.grad`` with the cross-entropy gradient of a few batches (Taylor importance)."""
    model.zero_grad(set_to_none=True)
    device = model_device(model)
    n = 0
    for x, y in batches:
        F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)).backward()
        n += 1
        if n >= max_batches:
            break
    require(n > 0, "taylor importance needs at least one batch of data to compute gradients")


# ---------------------------------------------------------------- application


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the ``k`` lowest of the flat ``scores``, ties broken by position (a
    threshold would take every tied weight and over-prune)."""
    drop = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        drop[torch.argsort(scores, stable=True)[:k]] = True
    return drop


PRUNERS: Registry[Callable[..., nn.Module]] = Registry("pruner")


@PRUNERS.register("unstructured")
def prune_unstructured(model: nn.Module, rate: float, importance: Importance, **_: Any) -> nn.Module:
    """Global pruning: zero exactly ``round(rate * N)`` of the N conv+linear weights, those
    with the lowest score across all layers, so sparsity equals the rate up to rounding.

    The classifier counts in N but is never pruned: its weights are the smallest in the
    net (init std 0.01) and a global threshold would delete it first, and with it the
    model. Weights already zero rank first, so repeated steps never regrow a weight;
    ties are broken by position, not by a threshold that over-prunes on equal scores."""
    out = classifier(model)
    all_layers = [m for _, m in prunable_layers(model)]
    layers = [m for m in all_layers if m is not out]
    n_all = sum(m.weight.numel() for m in all_layers)
    room = sum(m.weight.numel() for m in layers)
    require(
        round(rate * n_all) <= room,
        f"prune rate {rate} would need the classifier's weights too; at most {room / n_all:.3f}",
    )
    with torch.no_grad():
        scores = []
        for m in layers:
            s = importance.element(m.weight.detach(), None if m.weight.grad is None else m.weight.grad).float()
            scores.append(torch.where(m.weight == 0, torch.full_like(s, -1.0), s).flatten())
        drop = lowest(torch.cat(scores), int(round(rate * n_all)))
        start = 0
        for m in layers:
            n = m.weight.numel()
            m.weight.masked_fill_(drop[start : start + n].view_as(m.weight), 0.0)
            start += n
    return model


def prune_per_layer(model: nn.Module, rates: dict[str, float], importance: Importance) -> nn.Module:
    """Each named layer on its own: exactly ``round(rate * n)`` of its ``n`` weights zeroed,
    the lowest scores first (weights already zero rank first, ties by position), as the
    global pruner does across layers. What a per-layer allocation sets; layers not named
    keep their weights."""
    layers = dict(prunable_layers(model))
    unknown = sorted(set(rates) - set(layers))
    require(not unknown, f"per-layer prune rates name layers this model has no conv/linear for: {unknown[:5]}")
    with torch.no_grad():
        for name, rate in rates.items():
            require(0.0 <= rate < 1.0, f"prune rate of {name} must be in [0, 1), got {rate}")
            w = layers[name].weight
            s = importance.element(w.detach(), w.grad).float()
            s = torch.where(w == 0, torch.full_like(s, -1.0), s)
            w.masked_fill_(lowest(s.flatten(), int(round(rate * w.numel()))).view_as(w), 0.0)
    return model


@PRUNERS.register("structured")
def prune_structured(
    model: nn.Module,
    rate: float,
    importance: Importance,
    example_inputs: torch.Tensor | None = None,
    layer_rates: dict[str, float] | None = None,
    **_: Any,
) -> nn.Module:
    """Remove a ``rate`` fraction of the channels of every prunable group, counted against the
    base architecture (``model.spec``), so calling it again with a higher rate removes
    only the difference: that is how the gradual schedule runs. ``layer_rates`` gives each
    named layer's group its own rate instead (Torch-Pruning's ``pruning_ratio_dict``; a
    group's rate is its first layer's, so layers coupled through a residual add share one).

    Torch-Pruning traces the model once (in eval mode: a batch-1 trace through BatchNorm1d
    would fail in train mode) and groups every layer that must lose the same channels:
    both convs of a residual add, the shortcut projection, BNs, the next layer's input.
    In a model built by reference, attention loses whole heads, and a group it can't cut
    safely (one that runs through a raw parameter, such as a ViT's position embedding on
    the residual stream) keeps its channels: ``model.prune_skipped`` lists those layers."""

    if is_quantized(model):
        raise EffrayError("structured pruning must come before quantization: prune, fine-tune, then quantize")
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns of the raw parameters it finds; they stay whole
            _cut_channels(model, rate, importance, _example_inputs(model, example_inputs), layer_rates)
    finally:
        model.train(was_training)
    return model


def _cut_channels(
    model: nn.Module,
    rate: float,
    importance: Importance,
    example: torch.Tensor,
    layer_rates: dict[str, float] | None = None,
) -> None:
    skipped = unsafe_layers(model, example) if referenced(model) else {}
    model.prune_skipped = [f"{layer_name(model, m)}: {why}" for m, why in skipped.items()]
    keep = {id(m) for m in skipped}
    if layer_rates is not None:
        step_ratio, per_layer = 0.0, _layer_step_ratios(model, layer_rates, keep)
        if not per_layer:
            return
    else:
        now = channel_counts(model, skip=keep)
        base = _base_channel_counts(model, keep) or now
        step_ratio, per_layer = 1.0 - (1.0 - rate) / (sum(now) / max(sum(base), 1)), None
        if step_ratio <= 1e-9:
            return
    # choosing which channels go is a host decision (it sets the new shapes): the one
    # host read of a structured pruning event, which runs between epochs, never in a step
    pruner = structured_pruner(model, step_ratio, importance, example, ignored=list(skipped), per_layer=per_layer)
    pruner.step()
    set_heads(model, pruner)
    if referenced(model):
        check_forward(model, example)


def _layer_step_ratios(model: nn.Module, rates: dict[str, float], keep: set[int]) -> dict[nn.Module, float]:
    """Each named layer's ratio for this event: its rate of the base architecture's output
    channels, less what earlier events removed (a gradual schedule cuts the difference)."""
    spec = getattr(model, "spec", None)
    base = dict(prunable_layers(build_model(**spec))) if spec else {}
    out: dict[nn.Module, float] = {}
    for name, m in prunable_layers(model):
        if name not in rates or id(m) in keep or m is classifier(model):
            continue
        now, was = m.weight.shape[0], (base[name].weight.shape[0] if name in base else m.weight.shape[0])
        ratio = 1.0 - (1.0 - rates[name]) / (now / max(was, 1))
        if ratio > 1e-9:
            out[m] = ratio
    return out


def structured_pruner(
    model: nn.Module,
    step_ratio: float,
    importance: Importance,
    example_inputs: torch.Tensor | None = None,
    ignored: list[nn.Module] | None = None,
    per_layer: dict[nn.Module, float] | None = None,
) -> Any:
    """Torch-Pruning's ``MetaPruner`` over ``model`` with the classifier (and ``ignored``)
    protected; its dependency graph is traced with ``example_inputs`` (default: one random
    image of the model's input size) on the model's own device. Attention modules (timm's:
    a ``qkv`` linear and ``num_heads``) lose whole heads at the same ratio. ``per_layer``:
    a ratio for each of these layers' groups (the rest at ``step_ratio``)."""
    heads = attention_heads(model)
    return torch_pruning().pruner.MetaPruner(
        model,
        _example_inputs(model, example_inputs),
        importance=importance.group(),
        pruning_ratio=step_ratio,
        pruning_ratio_dict=per_layer or None,
        ignored_layers=[classifier(model), *(ignored or [])],
        **(
            {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": step_ratio}
            if heads
            else {}
        ),
    )


def _example_inputs(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    """One image to trace with: ``example_inputs``' first, or a random CIFAR-sized one."""
    if example_inputs is None:
        shape = (1, int((getattr(model, "spec", None) or {}).get("in_channels", 3)), 32, 32)
        return torch.randn(shape, device=model_device(model))
    return example_inputs[:1].to(model_device(model))


def _base_channel_counts(model: nn.Module, skip: set[int] | None = None) -> list[int] | None:
    spec = getattr(model, "spec", None)
    if not spec:
        return None
    base = build_model(**spec)
    names = {n for n, m in model.named_modules() if id(m) in (skip or set())}
    return channel_counts(base, skip={id(m) for n, m in base.named_modules() if n in names})


def prune_step(
    model: nn.Module,
    rate: float,
    kind: str = "unstructured",
    importance: str = "l1",
    *,
    example_inputs: torch.Tensor | None = None,
    batches: Batches | None = None,
    layer_rates: dict[str, float] | None = None,
) -> nn.Module:
    """Prune ``model`` (in place; also returned) to ``rate``: the one call a fine-tuning loop
    makes at each pruning event. ``batches`` of (x, y) feed the gradients Taylor needs;
    without them the gradients already in ``.grad`` are used. ``layer_rates`` prunes each
    named layer at its own rate instead (:func:`prune_per_layer`; structured: its channels).

    After structured pruning the parameters are new tensors: rebuild the optimizer."""
    require(isinstance(rate, (int, float)) and 0.0 <= rate < 1.0, f"prune rate must be in [0, 1), got {rate}")
    imp = IMPORTANCES.get(importance)
    pruner = PRUNERS.get(kind)
    if imp.needs_grad:
        if batches is not None:
            accumulate_grads(model, batches)
        elif not any(m.weight.grad is not None for _, m in prunable_layers(model)):
            raise EffrayError("taylor importance needs gradients: pass batches= or run a backward pass first")
    if layer_rates is not None and kind == "unstructured":
        out = prune_per_layer(model, layer_rates, imp)
    else:
        out = pruner(model, float(rate), imp, example_inputs=example_inputs, layer_rates=layer_rates)
    if imp.needs_grad:
        model.zero_grad(set_to_none=True)
    return out


class SparsityLock:
    """Keeps pruned weights at exactly zero while fine-tuning (SGD momentum and weight decay
    would regrow them): each conv/linear's forward first re-zeroes its pruned positions.

    The masks live only in this object; :meth:`release` applies them a last time and
    removes the hooks, so what is saved is plain weights with real zeros."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: dict[nn.Module, torch.Tensor] = {}
        self.handles = []
        for _, m in prunable_layers(model):
            # every layer, zeros or not: asking which layers have zeros would be a host read
            # per layer, and a mask of ones costs one elementwise multiply of its weight
            self.masks[m] = m.weight.detach() != 0
            self.handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, args: Any) -> None:
        with torch.no_grad():
            module.weight.mul_(self.masks[module])

    def apply(self) -> None:
        for m in self.masks:
            self._hook(m, ())

    def release(self) -> None:
        self.apply()
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> SparsityLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_sparsity(model: nn.Module) -> SparsityLock:
    """Freeze the current zero pattern of ``model`` until ``release()`` (or the ``with`` ends)."""
    return SparsityLock(model)
