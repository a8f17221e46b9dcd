"""Per-layer sensitivity: what compressing one layer costs when nothing else changes.

For each conv/linear layer and each candidate setting (k-bit weights, an unstructured prune
rate, a structured channel rate), a copy of the teacher with only that layer changed is
scored on calibration images, with no fine-tune: the accuracy and loss it loses against the
teacher say which layers take a low bit width or a high rate, and which must be spared (the
input of a per-layer allocation). The probes here are plain torch on any ``nn.Module``;
:mod:`effray.compress.sensitivity_run` runs them as Ray tasks, one per layer.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effray.compress.config import PRUNE_KINDS
from effray.compress.fakequant import WeightQuant
from effray.compress.layers import classifier, model_device
from effray.compress.measure import count_macs, parameter_count, scored
from effray.compress.prune import lowest, prunable_layers, torch_pruning
from effray.compress.quantize import quantizable, recalibrate_bn
from effray.compress.structure import check_forward
from effray.config import option, require
from effray.errors import EffrayError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
KINDS = ("bits", *PRUNE_KINDS)  # the ``kind`` column: what a probe changed


@dataclass(frozen=True)
class SensitivityConfig:
    """Which teacher, which data, which settings to probe per layer, and on what."""

    teacher: str = option("", "checkpoint to probe (a run directory or its model.pt from effray train)")
    data: str = option("", "a prepared dataset (effray data prepare); its val split is the calibration set")
    out: str = option("", "output directory: sensitivity.parquet, sensitivity.png, sensitivity.json, parts/")
    bits: str = option("2,4,8", "weight bit widths to probe per layer, comma-separated, each 2..8 ('' = none)")
    rates: str = option("0.25,0.5,0.75", "prune rates to probe per layer and kind, comma-separated, each in (0, 1)")
    kinds: str = option(
        "unstructured,structured",
        "pruning kinds to probe, comma-separated: unstructured (lowest-|w| zeros), structured (lowest-L1 "
        "channels removed with their coupled group) ('' = none)",
    )
    calib_images: int = option(512, "calibration images: the first N of the val split")
    batch_size: int = option(256, "images per forward pass")
    bn_recalib: bool = option(
        False, "re-estimate BatchNorm statistics on --bn-batches unaugmented train batches before scoring each probe"
    )
    bn_batches: int = option(4, "train batches for --bn-recalib")
    cpus_per_task: float = option(1.0, "logical CPUs per probe task, one task per layer (torch threads = floor)")
    gpus_per_task: float = option(0.0, "GPUs per probe task (a fraction shares one); 0 = probe on CPUs")
    trust_code: bool = option(
        False, "import the pkg.module:factory the checkpoint names to rebuild its model (never on a file's say-so)"
    )

    def validate(self) -> None:
        require(bool(self.teacher), "--teacher CKPT is required (a checkpoint from `effray train`)")
        require(bool(self.data), "--data DIR is required (a dataset from `effray data prepare`)")
        require(bool(self.out), "--out DIR is required")
        bits, rates, kinds = parse_bits(self.bits), parse_rates(self.rates), parse_kinds(self.kinds)
        require(bool(bits or kinds), "nothing to probe: give --bits, or --kinds with --rates")
        require(not kinds or bool(rates), f"--kinds {self.kinds} needs at least one --rates value")
        require(self.calib_images > 0, f"--calib-images must be > 0, got {self.calib_images}")
        require(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        require(self.bn_batches > 0, f"--bn-batches must be > 0, got {self.bn_batches}")
        require(self.cpus_per_task > 0, f"--cpus-per-task must be > 0, got {self.cpus_per_task}")
        require(self.gpus_per_task >= 0, f"--gpus-per-task must be >= 0, got {self.gpus_per_task}")

    def settings(self) -> list[Setting]:
        """Every setting a layer is probed at: bit widths, then each kind's rates, ascending."""
        out = [Setting("bits", float(b)) for b in parse_bits(self.bits)]
        return out + [Setting(k, r) for k in parse_kinds(self.kinds) for r in parse_rates(self.rates)]


@dataclass(frozen=True)
class Setting:
    """One probe of one layer: ``bits`` (weight bit width) or a pruning kind and its rate."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        return f"{int(self.value)}-bit" if self.kind == "bits" else f"{self.kind[0]}{self.value:g}"


def _items(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_bits(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)``; each must be 2..8 (32 would be the teacher itself)."""
    try:
        bits = sorted({int(t) for t in _items(text)})
    except ValueError:
        bits = [0]
    require(all(2 <= b <= 8 for b in bits), f"--bits must be comma-separated bit widths in 2..8, got {text!r}")
    return tuple(bits)


def parse_rates(text: str) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> ``(0.25, 0.5)``; each strictly between 0 and 1."""
    try:
        rates = sorted({float(t) for t in _items(text)})
    except ValueError:
        rates = [0.0]
    require(all(0.0 < r < 1.0 for r in rates), f"--rates must be comma-separated rates in (0, 1), got {text!r}")
    return tuple(rates)


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = _items(text)
    require(
        all(k in PRUNE_KINDS for k in kinds),
        f"--kinds must be a comma-separated subset of {', '.join(PRUNE_KINDS)}, got {text!r}",
    )
    return tuple(k for k in PRUNE_KINDS if k in kinds)


class Skipped(Exception):  # noqa: N818 - a probe's outcome, not a failure
    """A setting a layer can't take: the reason goes into the ``skipped_reason`` column."""


# ---------------------------------------------------------------- one changed layer


@torch.no_grad()
def with_bits(model: nn.Module, name: str, bits: int) -> nn.Module:
    """A copy of ``model`` whose layer ``name`` holds its per-channel ``bits``-bit weights
    (effray's own quantizer, MSE-initialised, dequantized); nothing else changes."""
    if not quantizable(model.get_submodule(name)):
        kind = type(model.get_submodule(name)).__name__
        raise Skipped(f"{kind} has a forward of its own and stays float when quantizing")
    out = copy.deepcopy(model)
    w = out.get_submodule(name).weight
    with torch.device(w.device):
        wq = WeightQuant(bits, w.shape[0], learn=False)
    wq.init_from(w)
    w.copy_(wq(w))
    return out


@torch.no_grad()
def with_zeros(model: nn.Module, name: str, rate: float) -> nn.Module:
    """A copy of ``model`` with exactly ``round(rate * n)`` of layer ``name``'s ``n``
    weights zeroed, the lowest |w| first (ties by position, as the global pruner breaks them)."""
    out = copy.deepcopy(model)
    w = out.get_submodule(name).weight
    w.masked_fill_(lowest(w.detach().abs().flatten(), int(round(rate * w.numel()))).view_as(w), 0.0)
    return out


def without_channels(model: nn.Module, name: str, rate: float, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with ``round(rate * c)`` of layer ``name``'s ``c`` output channels
    removed, the lowest L1 first, through Torch-Pruning's dependency graph: every layer
    coupled to them (a residual add's other branch, the shortcut, BNs, the next layer's
    input) loses the same channels, so the copy still runs. :class:`Skipped` says why a
    layer can't be cut (the classifier, a rate that removes no channel or all of them, a
    group through a raw parameter or attention, a graph that no longer runs)."""
    tp = torch_pruning()
    out = copy.deepcopy(model).eval()
    layer = out.get_submodule(name)
    if layer is classifier(out):
        raise Skipped("the classifier: removing its outputs would remove classes")
    channels = int(layer.weight.shape[0])
    k = int(round(rate * channels))
    if not 0 < k < channels:
        raise Skipped(f"rate {rate:g} of {channels} output channels removes {k}: nothing to probe")
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    # which channels go is a host decision (it sets the new shapes): one read per probe
    idxs = torch.argsort(layer.weight.detach().abs().flatten(1).sum(1), stable=True)[:k].tolist()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns of the raw parameters it finds
            graph = tp.DependencyGraph().build_dependency(out, example_inputs=example[:1].to(model_device(out)))
            group = graph.get_pruning_group(layer, fn, idxs=idxs)
    except Exception as exc:  # noqa: BLE001 - a graph Torch-Pruning can't trace or group
        raise Skipped(f"Torch-Pruning can't group its channels ({type(exc).__name__}: {_first_line(exc)})") from None
    why = _uncuttable(out, graph, group)
    if why:
        raise Skipped(why)
    group.prune()
    try:
        check_forward(out, example[:1].to(model_device(out)))
    except EffrayError as exc:
        raise Skipped(f"the cut graph no longer runs ({_first_line(exc)})") from None
    return out


def _uncuttable(model: nn.Module, graph: Any, group: Any) -> str:
    """Why Torch-Pruning must not cut this group ('' if it may): the groups structured
    pruning refuses (:func:`effray.compress.structure.unsafe_layers`), or the classifier's outputs."""
    if not graph.check_pruning_group(group):
        return "Torch-Pruning refuses the group (it would leave a layer with no channels)"
    out = classifier(model)
    for dep, _ in group:
        t = dep.target.module
        if isinstance(t, nn.Parameter):
            return "shares its channels with a raw parameter (e.g. a position embedding)"
        if isinstance(t, nn.MultiheadAttention):
            return "feeds a MultiheadAttention"
        if t is out and graph.is_out_channel_pruning_fn(dep.handler):
            return "coupled to the classifier's outputs"
    return ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def probed(model: nn.Module, name: str, setting: Setting, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with ``setting`` applied to layer ``name`` alone (``model`` untouched)."""
    if setting.kind == "bits":
        return with_bits(model, name, int(setting.value))
    if setting.kind == "unstructured":
        return with_zeros(model, name, setting.value)
    if setting.kind == "structured":
        return without_channels(model, name, setting.value, example)
    raise EffrayError(f"unknown probe kind {setting.kind!r}; one of {', '.join(KINDS)}")


# ---------------------------------------------------------------- scoring


def score(model: nn.Module, batches: Batches) -> dict[str, Any]:
    """Accuracy, mean cross-entropy and count of ``model`` on ``batches``: the package's one
    metrics pass (:func:`effray.compress.measure.scored`), read once."""
    m = scored(model, batches)
    return {"accuracy": m["accuracy"], "loss": m["loss"], "count": m["count"]}


def probe_layer(
    model: nn.Module,
    name: str,
    settings: Sequence[Setting],
    batches: Batches,
    recalib: Batches | None = None,
) -> list[dict[str, Any]]:
    """One row per setting of layer ``name``: its ``accuracy`` and ``loss`` on ``batches``
    with only that layer changed (BN statistics first re-estimated on ``recalib``, when
    given), the layer's weight count (``params``), the changed model's parameters and MACs
    per image (``model_params``, ``model_macs``) and the layers whose output channels it cut
    (``cut_layers``: a structured probe cuts the layer's whole coupled group), or the
    ``skipped_reason``. ``model`` is never modified; drops come from :func:`with_drops`."""
    params = int(model.get_submodule(name).weight.numel())
    channels = {n: m.weight.shape[0] for n, m in prunable_layers(model)}
    shape = tuple(batches[0][0].shape[1:])
    dense_macs: int | None = None  # the unchanged model's, counted once: only a structured probe changes them
    rows = []
    for s in settings:
        row = {"layer": name, "kind": s.kind, "value": float(s.value), "params": params}
        try:
            changed = probed(model, name, s, batches[0][0])
        except Skipped as why:
            unmeasured = {"accuracy": None, "loss": None, "model_params": None, "model_macs": None, "cut_layers": ""}
            rows.append({**row, **unmeasured, "skipped_reason": str(why)})
            continue
        if recalib is not None:
            recalibrate_bn(changed, recalib)
        m = score(changed, batches)
        cut = [n for n, layer in prunable_layers(changed) if layer.weight.shape[0] < channels.get(n, 0)]
        if s.kind == "structured":
            macs = count_macs(changed, shape)["macs"]
        else:
            dense_macs = dense_macs if dense_macs is not None else count_macs(model, shape)["macs"]
            macs = dense_macs
        rows.append(
            {
                **row,
                "accuracy": m["accuracy"],
                "loss": m["loss"],
                "model_params": parameter_count(changed),
                "model_macs": macs,
                "cut_layers": ",".join(cut),
                "skipped_reason": "",
            }
        )
    return rows


def with_drops(rows: Iterable[dict[str, Any]], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` with ``accuracy_drop`` (baseline - probed) and ``loss_increase`` (probed -
    baseline) against the teacher's own ``baseline`` score; None for a skipped probe."""
    out = []
    for r in rows:
        measured = r.get("accuracy") is not None
        out.append(
            {
                **r,
                "accuracy_drop": baseline["accuracy"] - r["accuracy"] if measured else None,
                "loss_increase": r["loss"] - baseline["loss"] if measured else None,
            }
        )
    return out


def layer_names(model: nn.Module) -> list[str]:
    """The layers a sensitivity pass probes: every conv and linear, in module order."""
    return [n for n, _ in prunable_layers(model)]
