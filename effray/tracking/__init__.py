"""Experiment tracking behind one small interface that works with or without wandb.

Only rank 0 makes a tracker (style: only rank 0 talks to the outside world). The mode
is decided once on the driver (:func:`decide_wandb_mode`, from the environment the CLI
passes in) and shipped to the worker inside the config, so workers read no env vars.
"""

from __future__ import annotations

from effray.tracking.base import (
    NullTracker,
    Tracker,
    TrackerSettings,
    decide_wandb_mode,
    stable_run_id,
)
from effray.tracking.wandb_tracker import WandbTracker

__all__ = ["NullTracker", "Tracker", "TrackerSettings", "decide_wandb_mode", "make_tracker", "stable_run_id"]


def make_tracker(settings: TrackerSettings | None) -> Tracker:
    """A wandb tracker, or a no-op one when tracking is off or wandb can't start."""
    if settings is None or settings.mode == "disabled":
        return NullTracker()
    return WandbTracker.start(settings)
