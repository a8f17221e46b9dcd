"""Accuracy and tail limits against the teacher: ``--max-drop`` and its kin.

NNCF's ``max_drop`` and Intel Neural Compressor's ``tolerable_loss`` stop compressing at
an accuracy limit; top-1 alone hides what compression costs the rare classes, the
calibration and the corrupted inputs, so the worst class, the ECE and the corruption
accuracy get limits of their own. Every limit is judged on val (the split the search
chooses by) against the teacher's own val scores; the test split then reports how the
choice holds (:mod:`effray.search.holdout`). With any limit set, the pick is the cheapest
model (per ``--objective``) within all of them, as NNCF returns the smallest model within
``max_drop``; the pareto scheduler stops a trial whose accuracy, worst-class recall, ECE
after temperature or corruption accuracy (what every epoch's validation scores; the last
only under ``--max-corruption-drop``) can no longer reach its limit
(:class:`effray.search.scheduler.ParetoASHA`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from effray.config import option, require
from effray.errors import EffrayError

POINTS = 100.0  # accuracies are fractions in the tables; limits are in percentage points
EPOCH_SCORES = ("accuracy", "worst_class_recall", "ece_scaled", "corruption_accuracy")  # what epochs score (val_<name>)


@dataclass(frozen=True)
class Constraints:
    """Limits every pick must meet on val, each against the teacher (0 = no limit)."""

    max_drop: float = option(
        0.0,
        "points of val accuracy a model may lose against the teacher: the pick is the cheapest model (per "
        "--objective) within it, and a trial that can no longer reach it is stopped (0 = no limit)",
    )
    max_worst_class_drop: float = option(
        0.0,
        "points of worst-class recall a model may lose against the teacher; a trial that can no longer reach it is "
        "stopped (0 = no limit)",
    )
    max_ece: float = option(
        0.0,
        "the largest expected calibration error a model may have after its temperature, as it is deployed (e.g. "
        "0.05); a trial that can no longer get below it is stopped (0 = no limit)",
    )
    max_corruption_drop: float = option(
        0.0,
        "points of mean corruption accuracy a model may lose against the teacher; scored after every epoch, so a "
        "trial that can no longer reach it is stopped (0 = no limit)",
    )

    def validate(self) -> None:
        for flag, value in (
            ("--max-drop", self.max_drop),
            ("--max-worst-class-drop", self.max_worst_class_drop),
            ("--max-corruption-drop", self.max_corruption_drop),
        ):
            require(0 <= value <= POINTS, f"{flag} is in points of accuracy, 0-100 (0 = no limit); got {value}")
        require(0 <= self.max_ece < 1, f"--max-ece is an ECE in [0, 1) (0 = no limit); got {self.max_ece}")

    @property
    def active(self) -> bool:
        return any((self.max_drop, self.max_worst_class_drop, self.max_ece, self.max_corruption_drop))

    def floors(self, teacher: Mapping[str, Any]) -> dict[str, float]:
        """``{score: lowest value}`` of the limits a trial can be held to while it trains
        (:data:`EPOCH_SCORES`), made absolute with the teacher's val scores."""
        return self._while_training(teacher, ">=")

    def ceilings(self, teacher: Mapping[str, Any]) -> dict[str, float]:
        """``{score: highest value}`` of those limits that cap a score (the ECE)."""
        return self._while_training(teacher, "<=")

    def _while_training(self, teacher: Mapping[str, Any], sense: str) -> dict[str, float]:
        limits = self.limits(teacher).items()
        return {column: bound for column, (s, bound) in limits if column in EPOCH_SCORES and s == sense}

    def limits(self, teacher: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
        """``{column: (">=" or "<=", bound)}`` of every active limit, made absolute with the teacher's scores."""
        out: dict[str, tuple[str, float]] = {}
        for column, drop in (
            ("accuracy", self.max_drop),
            ("worst_class_recall", self.max_worst_class_drop),
            ("corruption_accuracy", self.max_corruption_drop),
        ):
            if drop:
                if teacher.get(column) is None:
                    raise _missing(column)
                out[column] = (">=", float(teacher[column]) - drop / POINTS)
        if self.max_ece:
            out["ece_scaled"] = ("<=", self.max_ece)
        return out

    def within(self, table: pd.DataFrame, teacher: Mapping[str, Any]) -> np.ndarray:
        """Which rows meet every limit (a row without the score a limit needs does not)."""
        keep = np.ones(len(table), dtype=bool)
        for column, (sense, bound) in self.limits(teacher).items():
            if column not in table:
                raise _missing(column)
            values = table[column].to_numpy(dtype=float)  # NaN (not scored) compares False: not within
            keep &= values >= bound - 1e-12 if sense == ">=" else values <= bound + 1e-12
        return keep

    def describe(self) -> str:
        """The active limits as the report and the terminal say them."""
        parts = [
            f"{label} {value:g}{unit}"
            for label, value, unit in (
                ("accuracy drop ≤", self.max_drop, " pt"),
                ("worst-class recall drop ≤", self.max_worst_class_drop, " pt"),
                ("ECE (after T) ≤", self.max_ece, ""),
                ("corruption accuracy drop ≤", self.max_corruption_drop, " pt"),
            )
            if value
        ]
        return ", ".join(parts)


def _missing(column: str) -> EffrayError:
    flag = "--max-corruption-drop needs the corruption score: run the search with --robust-images > 0"
    return EffrayError(flag if column == "corruption_accuracy" else f"the trials have no {column} to limit")
