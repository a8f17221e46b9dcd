"""The multiple-choice knapsack every allocation solves: one :class:`Choice` per layer (or
group of coupled layers) with the smallest summed predicted drop whose summed cost stays
within a budget, by dynamic programming over the budget cut into :data:`STEPS` units.

A Lagrangian sweep (``argmin drop + lambda * cost`` per layer) reaches only the convex
hull's points and can land below what the uniform config itself scores; the DP does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STEPS = 4000  # budget units of the knapsack: rounding costs at most 1/4000 of the budget per layer


@dataclass(frozen=True)
class Choice:
    """One setting of one layer (or of one group of coupled layers): weight ``bits`` (32 =
    float), prune ``rate``, the predicted loss increase ``drop`` and its ``cost`` in the
    budget's unit (packed bytes; MACs for channel allocation)."""

    bits: int
    rate: float
    drop: float
    cost: int


def interpolated(points: dict[float, float], value: float) -> float:
    """The drop at ``value`` read off the probed ``points`` (linear between neighbours, the
    nearest probe beyond them); ``points`` hold the no-change anchor (32 bits, rate 0)."""
    xs = sorted(points)
    if value <= xs[0]:
        return points[xs[0]]
    if value >= xs[-1]:
        return points[xs[-1]]
    hi = next(i for i, x in enumerate(xs) if x >= value)
    x0, x1 = xs[hi - 1], xs[hi]
    return points[x0] + (points[x1] - points[x0]) * (value - x0) / (x1 - x0)


def allocate(choices: dict[str, list[Choice]], budget: int, steps: int = STEPS) -> dict[str, Choice]:
    """The choice per layer with the smallest summed drop whose summed cost is at most
    ``budget`` (the cheapest choice everywhere when even that is over it): a multiple-choice
    knapsack by dynamic programming over the budget cut into ``steps`` units, each choice's
    cost rounded up to whole units (so what it picks fits), the rounding's slack then spent
    by :func:`spend_slack`."""
    cheapest = {n: min(c, key=lambda c: (c.cost, c.drop)) for n, c in choices.items()}
    if total(cheapest) > budget:
        return cheapest
    unit = max(1, math.ceil(budget / steps))
    units = budget // unit
    best = np.zeros(units + 1)  # least summed drop within b units, over the layers so far
    picks = []
    for options in choices.values():
        here = np.full(units + 1, np.inf)
        arg = np.full(units + 1, -1, dtype=np.int64)
        for k, c in enumerate(options):
            need = math.ceil(c.cost / unit)
            if need > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[need:] = best[: units + 1 - need] + c.drop
            better = cand < here
            here[better], arg[better] = cand[better], k
        best = here
        picks.append(arg)
    if not np.isfinite(best[units]):
        return cheapest
    picked, b = {}, units
    for (name, options), arg in zip(reversed(list(choices.items())), reversed(picks)):
        c = options[int(arg[b])]
        picked[name] = c
        b -= math.ceil(c.cost / unit)
    return spend_slack(choices, {n: picked[n] for n in choices}, budget)


def spend_slack(choices: dict[str, list[Choice]], picked: dict[str, Choice], budget: int) -> dict[str, Choice]:
    """Upgrade layers while budget is left: each time the change that buys the most drop per
    unit of cost and still fits (what the knapsack's rounding to whole budget units left over)."""
    picked = dict(picked)
    while True:
        slack = budget - total(picked)
        best, best_gain = None, 0.0
        for name, options in choices.items():
            now = picked[name]
            for c in options:
                extra, gain = c.cost - now.cost, now.drop - c.drop
                if gain > 1e-12 and extra <= slack:
                    ratio = gain / max(extra, 1)
                    if ratio > best_gain:
                        best, best_gain = (name, c), ratio
        if best is None:
            return picked
        picked[best[0]] = best[1]


def total(picked: dict[str, Choice]) -> int:
    return sum(c.cost for c in picked.values())
