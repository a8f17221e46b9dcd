"""The tracker interface, its no-op, its settings and the wandb mode decision (the parts
that need no wandb import); :mod:`effray.tracking` re-exports them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class Tracker(Protocol):
    """What the training loop may tell the outside world."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_checkpoint(self, path: str, name: str, metadata: dict[str, Any]) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_image(self, key: str, path: str) -> None: ...

    def set_summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracking off (--no-wandb, ranks > 0, or wandb missing)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_checkpoint(self, path: str, name: str, metadata: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, key: str, path: str) -> None:
        pass

    def set_summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


@dataclass(frozen=True)
class TrackerSettings:
    """Everything a tracker needs, decided on the driver."""

    project: str
    name: str
    run_id: str
    mode: str  # online | offline | disabled
    dir: str  # where wandb writes (the run dir); "" = wandb's default
    config: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # runs of one experiment (a Tune search: its trials and its summary)
    job_type: str = ""  # "trial", "summary"; "" = wandb's default


def stable_run_id(storage: str, name: str) -> str:
    """The same id for the same --storage/--name, so a restarted or resumed run keeps
    writing to the same wandb run (``resume="allow"``)."""
    key = f"{storage.rstrip('/') if '://' in storage else os.path.abspath(storage)}::{name}"
    return "effray-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def decide_wandb_mode(requested: str, env: Mapping[str, str], disabled: bool = False) -> str:
    """``online``/``offline``/``disabled`` from the flag and the environment.

    ``auto`` follows ``WANDB_MODE`` when set, else goes online only when an API key is
    available (``WANDB_API_KEY`` or wandb's own settings/netrc) and offline otherwise:
    offline runs never block on the network and can be ``wandb sync``ed later."""
    if disabled or requested == "disabled":
        return "disabled"
    if requested != "auto":
        return requested
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    if env.get("WANDB_API_KEY"):
        return "online"
    return "online" if _stored_api_key() else "offline"


def _stored_api_key() -> bool:
    try:
        import wandb

        # no prompt and no server round trip: only "is a key configured here?"
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001 - no wandb, no key, bad settings: all mean "no key"
        return False
