"""Training on Ray Train: config, the one recipe loop, strategies, checkpoints.

``train(cfg)`` (the driver, :mod:`effray.train.run`) is the entry point. Every worker runs
:func:`effray.train.loop.train_loop_per_worker`: `effray train`'s hooks on the one recipe
loop (:mod:`effray.train.recipe`), which compression and the in-process fits share, around
the one training step (:mod:`effray.train.step`).
"""

from effray.train.config import TrainConfig
from effray.train.run import train

__all__ = ["TrainConfig", "train"]
