"""``effray tune``'s entry points, under the name ``effray.cli`` and ``effray.run`` import.

The search itself is split by job: its settings (:mod:`effray.search.config`), the space
(:mod:`effray.search.space`), what a trial shares (:mod:`effray.search.context`,
:mod:`effray.search.splits`), the trial (:mod:`effray.search.trial`) and the driver
(:mod:`effray.search.driver`). This module only names the driver's public pieces.
"""

from __future__ import annotations

from effray.search.config import TuneConfig
from effray.search.driver import trial_count, tune_compression
from effray.search.resources import check_trial_resources

__all__ = ["TuneConfig", "check_trial_resources", "trial_count", "tune_compression"]
