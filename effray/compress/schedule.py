"""Pruning schedules: the target rate as a function of the pruning event (one-shot; cubic,
Zhu & Gupta 2017). :func:`effray.compress.prune.prune_step` applies each event's rate."""

from __future__ import annotations

from collections.abc import Callable

from effray.registry import Registry

Schedule = Callable[[int, int, float, float], float]
SCHEDULES: Registry[Schedule] = Registry("pruning schedule")


@SCHEDULES.register("oneshot")
def oneshot(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """All of the target at the first event: the baseline every gradual schedule must beat."""
    return final if step >= 1 else initial


@SCHEDULES.register("cubic")
def cubic(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - t/n)^3 for events t = 1..n.

    Prunes fast while many redundant weights remain and slowly near the end, when every
    removal hurts and the fine-tuning between events has less to recover from."""
    t = min(max(step, 0), steps) / max(steps, 1)
    return final + (initial - final) * (1.0 - t) ** 3


def schedule_rates(name: str, steps: int, final: float, initial: float = 0.0) -> list[float]:
    """The target rate after each of ``steps`` pruning events (the last one is ``final``)."""
    fn = SCHEDULES.get(name)
    return [fn(k, steps, final, initial) for k in range(1, steps + 1)]
