"""The search's progress bar on the driver: a Ray Tune callback (see :mod:`effray.console`)."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from effray import console


class TrialProgress(Callback):
    """A Ray Tune callback drawing one bar over the search's trials, its postfix the
    measured, stopped and errored counts and the best accuracy so far. Created on the
    driver; the bar itself is not pickled with the experiment."""

    def __init__(self, total: int, desc: str = "trials") -> None:
        self.total, self.desc = total, desc
        self.counts = {"measured": 0, "stopped": 0, "errored": 0}
        self.best = float("nan")
        self._bar: Any = None
        self._finals: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None}

    def __reduce__(self) -> Any:
        return (_rebuild_progress, (self.total, self.desc))

    def _update(self, done: int = 0) -> None:
        if self._bar is None:
            self._bar = console.bar(self.total, self.desc, "trial")
        self._bar.update(done)
        best = "" if self.best != self.best else f" best {self.best:.4f}"
        self._bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.counts.items() if v) + best)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if result.get("final"):
            self._finals.add(trial.trial_id)
            acc = float(result.get("accuracy", 0.0))
            self.best = acc if self.best != self.best else max(self.best, acc)
        self._update()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.counts["measured" if trial.trial_id in self._finals else "stopped"] += 1
        self._update(1)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.counts["errored"] += 1
        self._update(1)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _rebuild_progress(total: int, desc: str) -> TrialProgress:
    return TrialProgress(total, desc)
