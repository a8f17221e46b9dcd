"""The wandb adapter. Every call is guarded: a tracking failure is logged, turns
tracking off for the rest of the run, and never fails training.

Ray Train V2 rejects Tune's ``WandbLoggerCallback``, so rank 0 calls wandb itself.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from effray.tracking.base import NullTracker, Tracker, TrackerSettings

log = logging.getLogger(__name__)


class WandbTracker:
    """One wandb run, resumed by its stable id after a restart."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, s: TrackerSettings) -> Tracker:
        """``wandb.init`` with ``resume="allow"``; a NullTracker if wandb can't start."""
        try:
            import wandb

            run = wandb.init(
                project=s.project,
                name=s.name,
                id=s.run_id,
                resume="allow",
                mode=s.mode,
                dir=s.dir or None,
                config=s.config,
                group=s.group or None,
                job_type=s.job_type or None,
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off", init_timeout=90),
            )
            return cls(run)
        except Exception as exc:  # noqa: BLE001 - any wandb problem means "no tracking"
            log.warning("wandb disabled for this run: could not start (%s: %s)", type(exc).__name__, exc)
            return NullTracker()

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("wandb %s failed, tracking off from here (%s: %s)", what, type(exc).__name__, exc)
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard("log", lambda: self.run.log(metrics, step=step))

    def log_checkpoint(self, path: str, name: str, metadata: dict[str, Any]) -> None:
        def upload() -> None:
            import wandb

            art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type="model", metadata=metadata)
            art.add_file(path, name="model.pt")  # copied to wandb's staging: the temp dir may go
            self.run.log_artifact(art, aliases=["latest", f"epoch-{metadata.get('epoch', 0)}"])

        self._guard("artifact", upload)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        def table() -> None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

        self._guard("table", table)

    def log_image(self, key: str, path: str) -> None:
        def image() -> None:
            import wandb

            self.run.log({key: wandb.Image(path)})

        self._guard("image", image)

    def set_summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None
