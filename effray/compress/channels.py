"""Per-layer structured (channel) rates under a MAC budget, from per-layer sensitivities.

Bits and zeros leave a model's dense MACs as they are; only removing channels lowers them.
A structured probe of ``effray sensitivity`` cuts a layer's whole coupled group (the convs
feeding one residual add, the shortcut: its ``cut_layers``) and records the cut model's
MACs, so each group is one choice here: rate 0, its probed rates and the uniform config's
own, each with its predicted drop (the probes' loss increase, the mean over the group's
members, interpolated) and the MACs it saves (the probe's model against the dense one,
interpolated). A multiple-choice knapsack (:mod:`effray.compress.knapsack`) keeps the
summed savings at least what the uniform config's rate saves with the smallest summed
drop; every member of a group then gets its group's rate (``layer_rates``).

Savings are added across groups: cutting two adjacent groups saves less than the sum (a
conv loses input and output channels at once), so the chosen config's MACs are checked on
the model the recipe builds (:func:`effray.compress.cost.predict_costs`) and the budget
tightened until they are at most the uniform config's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from effray.compress.config import CompressConfig, format_layers
from effray.compress.cost import predict_costs
from effray.compress.knapsack import Choice, allocate, interpolated
from effray.compress.prune import prunable_layers
from effray.config import require
from effray.errors import EffrayError

log = logging.getLogger(__name__)

TRIES = 8  # tightenings of the savings asked for before the uniform config is kept


def channel_groups(rows: list[dict[str, Any]]) -> tuple[dict[tuple[str, ...], dict[float, tuple[float, int]]], int]:
    """``({group: {rate: (loss increase, model MACs)}}, dense MACs)`` from a sensitivity
    table's structured probes; a group is the layers one probe cut together. The dense
    MACs are the largest any probe recorded (bits and zeros leave them as they are)."""
    require(
        any(r["kind"] == "structured" for r in rows),
        "the sensitivity table has no structured probes: run `effray sensitivity --kinds structured` on the teacher",
    )
    require(
        all("model_macs" in r and "cut_layers" in r for r in rows),
        "the sensitivity table predates channel allocation (no model_macs / cut_layers): run `effray sensitivity` "
        "again (finished probes of the current version are reused)",
    )
    dense = max(int(r["model_macs"]) for r in rows if r.get("model_macs") is not None)
    losses: dict[tuple[str, ...], dict[float, list[float]]] = {}
    macs: dict[tuple[str, ...], dict[float, int]] = {}
    for r in rows:
        if r["kind"] != "structured" or r.get("loss_increase") is None or not r.get("cut_layers"):
            continue
        group, rate = tuple(sorted(r["cut_layers"].split(","))), float(r["value"])
        losses.setdefault(group, {}).setdefault(rate, []).append(max(0.0, r["loss_increase"]))
        macs.setdefault(group, {})[rate] = int(r["model_macs"])
    out = {g: {rate: (sum(v) / len(v), macs[g][rate]) for rate, v in by_rate.items()} for g, by_rate in losses.items()}
    return out, dense


def group_choices(
    groups: dict[tuple[str, ...], dict[float, tuple[float, int]]], dense: int, cfg: CompressConfig
) -> dict[tuple[str, ...], list[Choice]]:
    """Each group's candidates (rate 0, its probed rates, ``cfg.prune_rate``) as knapsack
    choices whose ``cost`` is the MACs the group keeps beyond its deepest cut: the savings
    forgone, so "at least these savings" becomes "at most this cost"."""
    out = {}
    for group, probes in groups.items():
        drops = {0.0: 0.0, **{rate: loss for rate, (loss, _) in probes.items()}}
        saved = {0.0: 0.0, **{rate: float(dense - m) for rate, (_, m) in probes.items()}}
        rates = sorted({0.0, cfg.prune_rate, *probes})
        deepest = interpolated(saved, rates[-1])
        out[group] = [
            Choice(cfg.bits, rate, interpolated(drops, rate), int(round(deepest - interpolated(saved, rate))))
            for rate in rates
        ]
    return out


def as_channel_config(cfg: CompressConfig, picked: dict[tuple[str, ...], Choice], model: nn.Module) -> CompressConfig:
    """``cfg`` with every layer named in ``layer_rates``: a group's members at its rate, the
    layers no probe could cut (the classifier, a group Torch-Pruning refuses) at 0."""
    rates = {n: 0.0 for n, _ in prunable_layers(model)}
    for group, choice in picked.items():
        rates.update({n: choice.rate for n in group if n in rates})
    return dataclasses.replace(cfg, layer_rates=format_layers(rates))


def allocate_channels(
    teacher: nn.Module,
    cfg: CompressConfig,
    model: nn.Module,
    rows: list[dict[str, Any]],
    costs: Callable[[CompressConfig], dict[str, int]] | None = None,
    **meta: Any,
) -> CompressConfig:
    """``cfg`` (structured) with per-layer channel rates from the table ``rows`` whose model
    has at most the uniform ``cfg``'s MACs (both predicted on the recipe's own path:
    ``costs``, :func:`~effray.compress.cost.predict_costs` with ``meta`` when not given) and
    the smallest summed predicted drop; ``allocation: uniform`` when none fits (a warning)."""
    costs = costs or (lambda c: predict_costs(teacher, c, **meta))
    groups, dense = channel_groups(rows)
    layers = {n for n, _ in prunable_layers(model)}
    foreign = sorted({n for g in groups for n in g} - layers)
    if foreign:
        raise EffrayError(
            f"the sensitivity table's structured probes cut layers this model lacks (e.g. {foreign[0]}); "
            "run `effray sensitivity` on a checkpoint of the architecture being compressed"
        )
    choices = group_choices(groups, dense, cfg)
    target = costs(cfg)["macs"]
    deepest = sum(max(c.cost for c in options) for options in choices.values())  # every group at its deepest cut
    need = dense - target  # the savings the uniform config's rate buys
    for _ in range(TRIES):
        budget = int(deepest - need)
        if budget < 0:  # not even every group at its deepest cut saves that much
            break
        candidate = as_channel_config(cfg, allocate(choices, budget), model)
        macs = costs(candidate)["macs"]
        if macs <= target:
            return candidate
        need += (macs - target) * 1.05  # adjacent cuts overlap: ask for more savings than the sum promised
    log.warning(
        "no channel allocation fits the uniform config's %d MACs in %d tries; the uniform config is kept", target, TRIES
    )
    return dataclasses.replace(cfg, allocation="uniform")
