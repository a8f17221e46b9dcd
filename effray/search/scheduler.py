"""Multi-objective asynchronous successive halving (MO-ASHA, Schmucker et al. 2021) for Tune.

ASHA on accuracy alone keeps the most accurate third of the trials at every rung, and so it
stops exactly the trials a compression search is after: the small, slightly less accurate
models that make up the cheap end of the accuracy/size Pareto front. :class:`ParetoASHA`
judges a trial at a rung by non-dominated rank over (accuracy, costs) instead: it is
stopped only when it is dominated *and* outside the best fraction of the rung's trials by
front. The costs (predicted bytes, MACs) are known before training, so each trial reports
the same values with every epoch; accuracy gets a noise margin (``--acc-margin``), since
one epoch's validation accuracy on a small split is noisy.

With floors (``--max-drop``: the teacher's val accuracy less the drop; ``--max-worst-class-drop``:
its worst-class recall less that drop), a trial is also stopped at a rung when it can no
longer reach one: its value there plus the most any finished trial gained in that score
from that rung to its last epoch (and the noise margin) stays below the floor. Ceilings
(``--max-ece``, on the ECE after each epoch's temperature) are held the same way, the
other way up. Before a trial has finished, nobody is stopped for either. (Corruption
accuracy is measured on the final artifact only: its limit acts on the pick.)

A trial on its last epoch (``epoch >= epochs``) or sending its ``final`` report is never
stopped: when a short trial's last epoch lands on a rung, stopping it there would throw
away the fine-tune a moment before its final measurement, the only report the Pareto
report (:mod:`effray.search.aggregate`) reads.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from effray.atomic import write_file, write_json
from effray.errors import EffrayError

Rung = int | float
Point = Sequence[float]  # (metric, *costs)


def dominates(b: Point, a: Point, acc_margin: float = 0.0, cost_rtol: float = 0.0) -> bool:
    """Whether ``b`` beats ``a``: at least ``acc_margin`` more accurate, no costlier than
    ``a`` by more than ``cost_rtol`` on every cost, and strictly better somewhere (so
    exact ties never dominate each other)."""
    mb, *cb = b
    ma, *ca = a
    if mb < ma + acc_margin:
        return False
    if any(x > y + abs(y) * cost_rtol for x, y in zip(cb, ca)):
        return False
    return mb > ma or any(x < y for x, y in zip(cb, ca))


def nondominated_fronts(
    points: Mapping[str, Point], acc_margin: float = 0.0, cost_rtol: float = 0.0
) -> list[list[str]]:
    """Fronts F1, F2, ... of ``points`` (ids in insertion order within a front): F1 is
    dominated by nobody, F(k+1) only by members of F1..Fk. With a cost tolerance the
    relation can have cycles (equal accuracy, two costs each within tolerance); the trials
    caught in or behind one form one last front rather than being lost."""
    ids = list(points)
    beats: dict[str, list[str]] = {i: [] for i in ids}
    count = dict.fromkeys(ids, 0)
    for i in ids:
        for j in ids:
            if i != j and dominates(points[i], points[j], acc_margin, cost_rtol):
                beats[i].append(j)
                count[j] += 1
    fronts: list[list[str]] = []
    front = [i for i in ids if count[i] == 0]
    placed = 0
    while front:
        fronts.append(front)
        placed += len(front)
        nxt = set()
        for i in front:
            for j in beats[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.add(j)
        front = [i for i in ids if i in nxt]
    if placed < len(ids):
        done = {i for f in fronts for i in f}
        fronts.append([i for i in ids if i not in done])
    return fronts


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving on (``metric`` up, ``costs`` down).

    Rungs sit at ``grace_period * reduction_factor**k`` epochs of ``time_attr``. The first
    report at or past a rung the trial has not passed records its (metric, costs) there
    and judges it against every trial recorded at that rung so far, itself included: the
    rung's trials are sorted into non-dominated fronts and whole fronts are kept, best
    first, until at least ``ceil(n / reduction_factor)`` are kept; a trial outside that
    set is stopped. Fewer than ``min_rung_size`` trials at a rung stop nobody. Every stop
    is kept in :attr:`stopped` (and written to ``log_path``) with the trials that
    dominated it, so a surprising stop can be explained afterwards.

    Every non-final report needs ``time_attr``, ``last_attr``, ``metric`` and each of
    ``costs``. The state is plain dicts and lists, so the scheduler pickles with the
    experiment.
    """

    def __init__(
        self,
        *,
        metric: str = "val_accuracy",
        costs: Sequence[str] = ("predicted_bytes",),
        time_attr: str = "epoch",
        last_attr: str = "epochs",
        grace_period: int = 1,
        reduction_factor: float = 3,
        acc_margin: float = 0.005,
        cost_rtol: float = 0.0,
        min_rung_size: int = 2,
        log_path: str | None = None,
        floors: Mapping[str, float] | None = None,
        ceilings: Mapping[str, float] | None = None,
    ):
        costs = (costs,) if isinstance(costs, str) else tuple(costs)
        bad = [
            f"{name} {value} (needs {need})"
            for name, value, ok, need in [
                ("grace_period", grace_period, grace_period >= 1, ">= 1"),
                ("reduction_factor", reduction_factor, reduction_factor > 1, "> 1"),
                ("acc_margin", acc_margin, acc_margin >= 0, ">= 0"),
                ("cost_rtol", cost_rtol, cost_rtol >= 0, ">= 0"),
                ("min_rung_size", min_rung_size, min_rung_size >= 1, ">= 1"),
            ]
            if not ok
        ]
        if bad:
            raise EffrayError(f"ParetoASHA: invalid {', '.join(bad)}")
        if metric in costs:
            raise EffrayError(f"{metric!r} is both the metric (maximised) and a cost (minimised)")
        super().__init__()
        self._metric = metric
        self._mode = "max"
        self._costs = costs
        self._time_attr = time_attr
        self._last_attr = last_attr
        self._grace_period = grace_period
        self._rf = reduction_factor
        self._acc_margin = acc_margin
        self._cost_rtol = cost_rtol
        self._min_rung_size = min_rung_size
        self._log_path = None if log_path is None else str(log_path)
        self._floors = dict(floors or {})  # reported score -> the lowest value a trial must still reach
        self._ceilings = dict(ceilings or {})  # reported score -> the highest value a trial must still get below
        self._ended: dict[str, dict[str, float]] = {}  # trial id -> its floored scores on its last fine-tune epoch
        self._scores: dict[Rung, dict[str, dict[str, float]]] = {}  # rung -> trial id -> its floored scores
        # rung -> trial id -> (metric, *costs), in arrival order
        self._rungs: dict[Rung, dict[str, list[float]]] = {}
        self._last_rung: dict[str, Rung] = {}  # trial id -> the highest rung it was judged at
        self.stopped: dict[str, dict[str, Any]] = {}
        # would have been stopped, but was on its last epoch
        self.spared: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------- Tune's interface

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Agree to Tune's metric/mode only when they match ours (``metric``, maximised);
        False makes Tune raise its 'already instantiated with metric and mode' error."""
        return metric in (None, self._metric) and mode in (None, "max")

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("final") or result.get("finetuned"):  # the artifact measured; a Ray Train trial's own end
            return TrialScheduler.CONTINUE
        t, last = self._need(result, self._time_attr), self._need(result, self._last_attr)
        point = [_worst_if_nan(self._need(result, self._metric), -math.inf)]
        point += [_worst_if_nan(self._need(result, c), math.inf) for c in self._costs]
        tid = trial.trial_id
        scores = {k: _worst_if_nan(self._need(result, k), -math.inf) for k in self._floors}
        scores |= {k: _worst_if_nan(self._need(result, k), math.inf) for k in self._ceilings}
        if t >= last:
            self._ended[tid] = scores
        rung = self._rung_for(t, self._last_rung.get(tid, 0))
        if rung is None:
            return TrialScheduler.CONTINUE
        self._rungs.setdefault(rung, {})[tid] = point
        self._scores.setdefault(rung, {})[tid] = scores
        self._last_rung[tid] = rung
        verdict = self._below_floor(rung, tid) or self._judge(rung, tid)
        if verdict is None:
            return TrialScheduler.CONTINUE
        verdict["epoch"] = _plain(t)
        if t >= last:  # its final measurement comes next: let it through
            self.spared[tid] = verdict
            return TrialScheduler.CONTINUE
        self.stopped[tid] = verdict
        if self._log_path:
            write_json(Path(self._log_path), self.stopped)
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        """Nothing to do: the trial's last epoch was judged in :meth:`on_trial_result`
        (its ``final`` report measures the artifact, not the fine-tune), and its rung
        values stay for the trials that arrive later, as in ASHA."""

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        """Keep what the trial recorded: later arrivals are still judged against it."""

    def debug_string(self) -> str:
        rungs = " | ".join(f"{r}: {len(rec)}" for r, rec in sorted(self._rungs.items()))
        costs = ", ".join(self._costs) or "(no costs)"
        floor = "".join(f", {k} floor {v:.4f}" for k, v in self._floors.items())
        floor += "".join(f", {k} ceiling {v:.4f}" for k, v in self._ceilings.items())
        return (
            f"ParetoASHA: max {self._metric} vs min {costs} (margin {self._acc_margin}{floor}, "
            f"cost rtol {self._cost_rtol}, rf {self._rf}); stopped {len(self.stopped)}, "
            f"spared on last epoch {len(self.spared)}; trials per rung: {rungs or 'none yet'}"
        )

    def save(self, checkpoint_path: str) -> None:
        data = pickle.dumps(self.__dict__)
        write_file(checkpoint_path, lambda tmp: tmp.write_bytes(data))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))

    # ------------------------------------------------------------- introspection

    def rungs_reached(self, trial_id: str) -> list[Rung]:
        """The rungs where ``trial_id`` was recorded (and judged), lowest first."""
        return sorted(r for r, rec in self._rungs.items() if trial_id in rec)

    def recorded(self, rung: Rung) -> dict[str, list[float]]:
        """A copy of what each trial recorded at ``rung``, in arrival order."""
        return {k: list(v) for k, v in self._rungs.get(_plain(rung), {}).items()}

    # ------------------------------------------------------------- internals

    def _need(self, result: Mapping[str, Any], key: str) -> Any:
        if result.get(key) is None:
            raise EffrayError(
                f"ParetoASHA needs {key!r} in every epoch report, but a result has only "
                f"{sorted(result)}; report it with each epoch (metric {self._metric!r}, costs "
                f"{list(self._costs)}, time {self._time_attr!r}, length {self._last_attr!r})"
            )
        return result[key]

    def _rung_for(self, t: float, after: Rung) -> Rung | None:
        """The largest rung in (after, t]: a trial whose reports skip a rung is judged at
        the highest one it reached, once."""
        best, k = None, 0
        while (r := self._grace_period * self._rf**k) <= t:
            if r > after:
                best = _plain(r)
            k += 1
        return best

    def headroom(self, rung: Rung, score: str | None = None) -> float | None:
        """The most a finished trial gained in ``score`` (a floored one, default the metric;
        for a ceiled one, the most it fell) from ``rung`` to its last epoch (never below 0),
        or None while no trial recorded at ``rung`` has finished."""
        score = score or self._metric
        sign = -1.0 if score in self._ceilings else 1.0
        gains = [
            sign * (self._ended[other][score] - mine[score])
            for other, mine in self._scores.get(_plain(rung), {}).items()
            if other in self._ended and score in mine
        ]
        return max(0.0, *gains) if gains else None

    def _below_floor(self, rung: Rung, tid: str) -> dict[str, Any] | None:
        """The record of why ``tid`` can no longer reach a floor (or get below a ceiling), else None."""
        me, mine = self._rungs[rung][tid], self._scores[rung][tid]
        bounds = [(k, v, 1.0) for k, v in self._floors.items()] + [(k, v, -1.0) for k, v in self._ceilings.items()]
        for score, bound, sign in bounds:
            room = self.headroom(rung, score)
            if room is None or sign * mine[score] + room + self._acc_margin >= sign * bound:
                continue
            side, kind = ("below", "floor") if sign > 0 else ("above", "ceiling")
            return {
                "rung": rung,
                "reason": f"{side} the {'accuracy' if score == self._metric else score} {kind}",
                kind: bound,
                "headroom": room,
                "dominated_by": [],
                self._metric: me[0],
                **({score: mine[score]} if score != self._metric else {}),
                **dict(zip(self._costs, me[1:])),
            }
        return None

    def _judge(self, rung: Rung, tid: str) -> dict[str, Any] | None:
        """None to continue, else the record of why ``tid`` is outside the keep set."""
        points = self._rungs[rung]
        n = len(points)
        if n < self._min_rung_size:
            return None
        fronts = nondominated_fronts(points, self._acc_margin, self._cost_rtol)
        quota, kept, keep_fronts = math.ceil(n / self._rf), 0, 0
        while kept < quota:  # whole fronts, best first; F1 always
            kept += len(fronts[keep_fronts])
            keep_fronts += 1
        rank = next(i for i, front in enumerate(fronts, 1) if tid in front)
        if rank <= keep_fronts:
            return None
        better = [b for front in fronts[: rank - 1] for b in front]
        me = points[tid]
        by = [b for b in better if dominates(points[b], me, self._acc_margin, self._cost_rtol)]
        return {
            "rung": rung,
            "rank": rank,
            "rung_size": n,
            "kept": kept,
            "dominated_by": by,
            self._metric: me[0],
            **dict(zip(self._costs, me[1:])),
        }


def _plain(x: Any) -> Any:
    """Whole numbers as ints (rung 3, not 3.0), so rung keys and the JSON log read cleanly."""
    x = float(x)
    return int(x) if x.is_integer() else x


def _worst_if_nan(x: Any, worst: float) -> float:
    """A diverged trial (NaN) ranks as the worst value; non-numbers are the trainable's bug."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise EffrayError(f"ParetoASHA needs numbers in its result keys, got {x!r}") from None
    return worst if math.isnan(v) else v


def on_last_epoch(result: Mapping[str, Any], time_attr: str = "epoch", last_attr: str = "epochs") -> bool:
    """Whether a report is a trial's last training epoch (or its final measurement)."""
    return bool(result.get("final")) or result.get(time_attr, 0) >= result.get(last_attr, math.inf)


class LastEpochSafeASHA(ASHAScheduler):
    """Ray's ASHA on accuracy alone, except that a trial on its last fine-tuning epoch goes
    on to its final measurement (plain ASHA may stop it there, after it paid for training)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if on_last_epoch(result, self._time_attr) else decision
