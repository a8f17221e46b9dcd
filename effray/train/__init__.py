"""Data-parallel training on Ray Train: config, per-worker loop, strategies, checkpoints.

``train(cfg)`` (the driver, :mod:`effray.train.run`) is the entry point; the loop in
:mod:`effray.train.loop` holds all torch code and runs on every worker.
"""

from effray.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig) -> dict:
    """Train or resume the run ``cfg`` describes (see :func:`effray.train.run.train`)."""
    from effray.train.run import train as _train

    return _train(cfg)
