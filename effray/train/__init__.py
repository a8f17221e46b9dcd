"""Data-parallel training on Ray Train: config, per-worker loop, strategies, checkpoints.

``train(cfg)`` (the driver, :mod:`effray.train.run`) is the entry point; the loop in
:mod:`effray.train.loop` holds all torch code and runs on every worker.
"""

from effray.train.config import TrainConfig
from effray.train.run import train

__all__ = ["TrainConfig", "train"]
