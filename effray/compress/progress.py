"""A fine-tune in progress as a checkpoint: what a restarted trial or worker resumes from.

After every epoch a loop may keep ``progress_payload(...)`` (the student as trained so far,
its optimizer, the LR step, the RNG) as a checkpoint; ``resume_student`` turns it back into
the loop's state, so a fine-tune killed with its node (a Tune trial, a Ray Train restart)
goes on from its last epoch instead of from the teacher. Structural events at epochs
before the resume point are already in the restored student and are not replayed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effray.compress.artifact import restore, snapshot
from effray.compress.config import CompressConfig
from effray.compress.prune import SparsityLock
from effray.config import require, to_dict
from effray.train.checkpoint import FORMATS, rng_state, set_rng_state

PROGRESS_FORMAT = "effray.compress.progress/1"


def progress_payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: CompressConfig,
    *,
    epochs_done: int,
    step: int,
    lock: SparsityLock | None,
    device: torch.device | str = "cpu",
    **extra: Any,
) -> dict[str, Any]:
    """What a fine-tune resumes from after ``epochs_done`` epochs: the student's modules and
    latent weights (:func:`effray.compress.artifact.snapshot`), the optimizer, the LR step,
    the RNG, the config it belongs to, and ``extra`` (e.g. the epochs reported so far).
    Weights-only loadable, like every effray checkpoint."""
    if lock is not None:
        lock.apply()  # the last optimizer step moved masked weights; the next forward would re-zero them
    return {
        "format": PROGRESS_FORMAT,
        "epochs_done": epochs_done,
        "step": step,
        "student": snapshot(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(torch.device(device)),
        "config": to_dict(cfg),
        **extra,
    }


def resume_student(
    payload: dict[str, Any], cfg: CompressConfig, device: torch.device | str = "cpu"
) -> tuple[nn.Module, int, int, dict[str, Any]]:
    """``(student on device, epochs done, LR step, optimizer state)`` from
    :func:`progress_payload`; the RNG is restored too. A checkpoint of another config (a
    changed search space under the same experiment name) is refused in one line."""
    require(
        payload.get("format") == PROGRESS_FORMAT,
        f"not a fine-tuning checkpoint ({payload.get('format')!r}, expected {PROGRESS_FORMAT})",
    )
    require(
        payload.get("config") == to_dict(cfg),
        "the fine-tuning checkpoint belongs to another compression config; resume with the same config or use a new "
        "--name",
    )
    device = torch.device(device)
    model = restore(payload["student"], learn=True).to(device)
    set_rng_state(payload["rng"], device)
    return model, int(payload["epochs_done"]), int(payload["step"]), payload["optimizer"]


@FORMATS.register(PROGRESS_FORMAT)
def _progress_model(payload: dict[str, Any]) -> nn.Module:
    """A mid-compression checkpoint opens as the student it holds (``effray evaluate`` on it)."""
    return restore(payload["student"], learn=False).eval()
