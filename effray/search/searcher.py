"""What the search suggests: configs with their costs known before they run, within budget.

A compression config's size on disk, parameters and MACs follow from the teacher and the
config (:func:`effray.compress.cost.predict_costs`), so the searcher predicts them on the
driver as it suggests. A config that cannot meet ``--max-size-kb``/``--max-macs``/
``--max-latency-ms`` never becomes a trial (Optuna is told it failed, so it learns the
boundary), and every trial carries its predicted costs from its first epoch, which is
what the multi-objective scheduler (:mod:`effray.search.scheduler`) ranks it by.

With ``--prune-to-latency``, a structured-pruning config predicted slower than
``--max-latency-ms`` is not skipped but pruned harder: its prune rate raised to the smallest
above the sampled one that meets the target on the cost model (:func:`prune_to_latency`).
Channels that are really removed are the one lever that makes a dense CPU kernel faster,
so the search aims it at the latency the user asked for.

Random and grid sampling are done here over effray's own space (:mod:`effray.search.space`)
with a seeded generator; Optuna (TPE, or NSGA-II with ``--multi-objective``) is wrapped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from effray.compress.allocate import Allocator, is_allocated
from effray.compress.config import CompressConfig
from effray.compress.cost import estimate_latency_ms, predict_costs
from effray.config import from_dict, merge
from effray.errors import EffrayError
from effray.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

# fields that change how a student is trained, not what the artifact holds
_TRAINING_ONLY = (
    "finetune_epochs",
    "finetune_lr",
    "finetune_batch_size",
    "kd_alpha",
    "kd_temperature",
    "calib_batches",
    "quant_mode",
    "prune_schedule",
    "prune_steps",
    "int8",
)


@dataclass(frozen=True)
class Budget:
    """Limits a deployable model must meet (0 = none)."""

    max_size_kb: float = 0.0
    max_macs: float = 0.0
    max_latency_ms: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.max_size_kb or self.max_macs or self.max_latency_ms)

    def violation(self, costs: dict[str, float]) -> str:
        """Why ``costs`` break the budget ("" when they fit)."""
        out = []
        if self.max_size_kb and costs["bytes"] > self.max_size_kb * 1024:
            out.append(f"{costs['bytes'] / 1024:.1f} KB > --max-size-kb {self.max_size_kb:g}")
        if self.max_macs and costs["macs"] > self.max_macs:
            out.append(f"{costs['macs']:,} MACs > --max-macs {self.max_macs:,.0f}")
        if self.max_latency_ms and costs["latency_ms"] > self.max_latency_ms:
            out.append(f"~{costs['latency_ms']:.3f} ms > --max-latency-ms {self.max_latency_ms:g}")
        return "; ".join(out)


class CostModel:
    """Predicted costs of a trial's config (cached by what decides the artifact). The
    teacher is loaded on first use and not pickled with the searcher."""

    def __init__(
        self,
        teacher_path: str,
        base: dict[str, Any],
        teacher_metrics: dict[str, Any],
        teacher_info: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.teacher_path, self.base, self.teacher_metrics = teacher_path, dict(base), dict(teacher_metrics)
        self.meta = {"teacher_info": teacher_info, "data": data}  # what the artifact records of both: its bytes too
        self._teacher: Any = None
        self._allocator: Allocator | None = None
        self._cache: dict[str, dict[str, float]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_teacher": None, "_allocator": None}

    def teacher(self) -> Any:
        if self._teacher is None:
            self._teacher, _ = load_checkpoint(self.teacher_path, trust_code=True)  # the context loaded it first
        return self._teacher

    def allocate(self, compress: dict[str, Any]) -> dict[str, Any]:
        """``compress`` with an ``allocation: sensitivity`` made concrete: the per-layer bits
        and rates (:func:`~effray.compress.allocate.allocated`) a trial then trains as given."""
        cfg = merge(from_dict(CompressConfig, self.base), compress)
        if not is_allocated(cfg):
            return compress
        key = "allocate:" + json.dumps({k: v for k, v in sorted(vars(cfg).items()) if k not in _TRAINING_ONLY})
        if key not in self._cache:
            if self._allocator is None:
                self._allocator = Allocator(self.teacher(), **self.meta)
            done = self._allocator(cfg)
            self._cache[key] = {
                "layer_bits": done.layer_bits,
                "layer_rates": done.layer_rates,
                "allocation": done.allocation,  # uniform when no allocation fitted
            }
        return {**compress, **self._cache[key]}

    def __call__(self, compress: dict[str, Any]) -> dict[str, float]:

        cfg = merge(from_dict(CompressConfig, self.base), compress)
        key = json.dumps({k: v for k, v in sorted(vars(cfg).items()) if k not in _TRAINING_ONLY}, default=str)
        if key not in self._cache:
            costs: dict[str, float] = dict(predict_costs(self.teacher(), cfg, **self.meta))
            t = self.teacher_metrics  # the teacher's latency on the deploy runtime, when the search deploys
            ms = t.get("deployed_latency_ms_b1") or t["latency_ms_b1"]
            costs["latency_ms"] = estimate_latency_ms(costs["macs"], t["macs"], ms)
            self._cache[key] = costs
        return dict(self._cache[key])


MAX_PRUNE_RATE = 0.95  # the most --prune-to-latency may cut (CompressConfig takes rates below 1)
PRUNE_STEP = 0.05  # its scan's step, refined by bisection within the first step that meets the target


def prune_to_latency(
    compress: dict[str, Any], costs: CostModel, target_ms: float, steps: int = 6
) -> dict[str, Any] | None:
    """``compress`` with its structured prune rate raised to the smallest above its own whose
    predicted batch-1 latency meets ``target_ms``, or None when no rate up to
    :data:`MAX_PRUNE_RATE` does or the config does not prune structurally. A scan in
    :data:`PRUNE_STEP` steps finds the first rate that meets it and a bisection within that
    step refines it: the predicted MACs need not fall monotonically at high rates (groups the
    pruner cannot cut further are kept whole), so no bisection over the whole range."""
    if compress.get("prune_kind") != "structured":
        return None
    low = float(compress.get("prune_rate") or 0.0)

    def fits(rate: float) -> bool:
        return costs({**compress, "prune_rate": round(rate, 4)})["latency_ms"] <= target_ms

    if fits(low):
        return compress
    below = low
    for high in np.arange(low + PRUNE_STEP, MAX_PRUNE_RATE + 1e-9, PRUNE_STEP):
        if fits(high):
            for _ in range(steps):  # fits(high) holds throughout, fits(below) never
                mid = (below + high) / 2
                below, high = (below, mid) if fits(mid) else (mid, high)
            return {**compress, "prune_rate": round(float(high), 4)}
        below = high
    return None


class SpaceSampler:
    """Random draws from an effray space; with grid entries, their cartesian product,
    each point ``repeats`` times (the other entries drawn afresh)."""

    def __init__(self, space: dict[str, Any], seed: int, repeats: int = 1) -> None:
        self.space, self.rng = space, np.random.default_rng(seed)
        grid = {k: s["grid"] for k, s in space.items() if isinstance(s, dict) and "grid" in s}
        self.points = [dict(zip(grid, p)) for p in itertools.product(*grid.values())] if grid else None
        self.repeats, self.drawn = repeats, 0

    def next(self) -> dict[str, Any] | None:
        """The next config's ``compress`` dict, or None when a grid is exhausted."""
        fixed: dict[str, Any] = {}
        if self.points is not None:
            if self.drawn >= len(self.points) * self.repeats:
                return None
            fixed = self.points[self.drawn % len(self.points)]
        self.drawn += 1
        return {k: fixed[k] if k in fixed else self._draw(spec) for k, spec in self.space.items()}

    def _draw(self, spec: Any) -> Any:
        if not isinstance(spec, dict):
            return spec
        (kind, args), rng = next(iter(spec.items())), self.rng
        if kind == "choice":
            return args[int(rng.integers(len(args)))]
        if kind == "uniform":
            return float(rng.uniform(args[0], args[1]))
        if kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
        if kind == "randint":
            return int(rng.integers(args[0], args[1]))
        if kind == "quniform":
            return float(round(rng.uniform(args[0], args[1]) / args[2]) * args[2])
        raise EffrayError(f"cannot sample {spec!r}")


class CostAwareSearch(Searcher):
    """Suggests ``{"compress": config, "predicted": costs}`` within ``budget``: from the
    sampler (random/grid) or from ``inner`` (Optuna), which is told a rejected config
    scored nothing at its predicted cost. ``constants``: the space's fixed entries, added
    to every suggestion of ``inner``."""

    def __init__(
        self,
        costs: CostModel,
        budget: Budget,
        *,
        sampler: SpaceSampler | None = None,
        inner: Searcher | None = None,
        constants: dict[str, Any] | None = None,
        metric: str = "val_accuracy",
        max_tries: int = 64,
        fit_latency: bool = False,
    ) -> None:
        super().__init__(metric=metric, mode="max")
        if (sampler is None) == (inner is None):
            raise ValueError("give exactly one of sampler and inner")
        self.costs, self.budget, self.sampler, self.inner, self.max_tries = costs, budget, sampler, inner, max_tries
        self.fit_latency = fit_latency and bool(budget.max_latency_ms)  # --prune-to-latency
        self.constants = dict(constants or {})  # the space's fixed entries, which Optuna's space drops
        self.inner_ids: dict[str, str] = {}
        self.rejected = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        return True  # the space is ours (or the inner searcher's); Tune's param_space is empty

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for attempt in range(self.max_tries):
            iid = trial_id if attempt == 0 else f"{trial_id}-rejected{attempt}"
            if self.sampler is not None:
                compress = self.sampler.next()
                if compress is None:
                    return Searcher.FINISHED
            else:
                suggestion = self.inner.suggest(iid)
                if suggestion in (None, Searcher.FINISHED):
                    return suggestion
                compress = {**self.constants, **suggestion["compress"]}
            compress = self.costs.allocate(compress)
            predicted = self.costs(compress)
            why = self.budget.violation(predicted)
            if why and self.fit_latency:
                harder = prune_to_latency(compress, self.costs, self.budget.max_latency_ms)
                if harder is not None and harder != compress:
                    log.info(
                        "pruned to the latency target: prune_rate %s -> %s",
                        compress["prune_rate"],
                        harder["prune_rate"],
                    )
                    compress, predicted = harder, self.costs(harder)
                    why = self.budget.violation(predicted)
            if not why:
                self.inner_ids[trial_id] = iid
                return {"compress": compress, "predicted": predicted}
            self.rejected += 1
            log.info("skipped a config over budget (%s): %s", why, compress)
            if self.inner is not None:
                self.inner.on_trial_complete(iid, {self.metric: 0.0, "accuracy": 0.0, "bytes": predicted["bytes"]})
        log.warning("no config within the budget in %d draws; the search ends here", self.max_tries)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.inner is not None and trial_id in self.inner_ids:
            self.inner.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self.inner is not None and trial_id in self.inner_ids:
            # a trial stopped before its final measurement is pruned for Optuna, not scored
            measured = result if result and result.get("final") else None
            self.inner.on_trial_complete(self.inner_ids.pop(trial_id), result=measured, error=error)

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "inner"}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)
        if self.inner is not None:
            self.inner.save(checkpoint_path + ".inner")

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        if self.inner is not None:
            self.inner.restore(checkpoint_path + ".inner")


def check_feasible(
    space: dict[str, Any], costs: CostModel, budget: Budget, seed: int, draws: int = 32, fit_latency: bool = False
) -> None:
    """Fail in one line, before any trial, when no config drawn from the space fits the
    budget (``fit_latency``: a structured config may first be pruned to the latency target)."""
    if not budget.active:
        return
    sampler, smallest = SpaceSampler(space, seed + 7919), None
    for _ in range(draws):
        compress = sampler.next()
        if compress is None:
            break
        if fit_latency and budget.max_latency_ms:
            compress = prune_to_latency(compress, costs, budget.max_latency_ms) or compress
        predicted = costs(compress)
        if not budget.violation(predicted):
            return
        smallest = predicted if smallest is None or predicted["bytes"] < smallest["bytes"] else smallest
    detail = f"; the smallest drawn is {budget.violation(smallest)}" if smallest else ""
    raise EffrayError(
        f"no config of the space fits the budget in {draws} draws{detail}; raise the budget or "
        "widen the space (higher --prune-rate, fewer --bits)"
    )
