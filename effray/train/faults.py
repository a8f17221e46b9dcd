"""``--inject-failure-at-epoch``: one worker dies once, on purpose, to show a run survives it.

The whole mechanism is here: which rank dies (rank 1, or 0 when alone), when (the first
step of the given 1-based epoch), and the marker file in the run directory that stops the
restarted worker from dying again. Tests drive it through the CLI flag.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from effray.console import say

FAILURE_MARKER = ".effray-injected-failure"


@dataclass(frozen=True)
class InjectedFailure:
    """``epoch``: the 1-based epoch whose first step kills the victim (-1 = never);
    ``run_dir``: where the marker goes ("" = remote storage: never)."""

    epoch: int = -1
    run_dir: str = ""

    def due(self, epoch: int, step: int, rank: int, world: int) -> bool:
        """Whether this rank dies now (``epoch``, ``step``: 0-based)."""
        victim = 1 if world > 1 else 0
        return bool(self.run_dir) and epoch + 1 == self.epoch and step == 0 and rank == victim

    def maybe_die(self, epoch: int, step: int, rank: int, world: int) -> None:
        if self.due(epoch, step, rank, world):
            die_once(Path(self.run_dir))


def die_once(run_dir: Path) -> None:
    """Exit hard (as an OOM kill would) the first time only; the marker in the run dir
    stops the restarted worker from dying again."""
    import ray.train

    marker = run_dir / FAILURE_MARKER
    if marker.exists():
        return
    # die only once the previous epoch's checkpoint is durable: otherwise whether the
    # restart resumes from it or the one before depends on when Ray Train processed the
    # last report, and a test of "resumes from epoch N-1" would be a race
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"pid {os.getpid()} died on purpose at {time.time():.0f}\n")
    say("[effray] injected failure: this worker exits now")
    os._exit(1)
