"""Training on Ray Train: config, the one recipe loop, strategies, checkpoints.

``train(cfg)`` (the driver, :mod:`effray.train.run`) is the entry point. Every worker runs
:func:`effray.train.loop.train_loop_per_worker`: `effray train`'s hooks on the one recipe
loop (:mod:`effray.train.recipe`), which compression and the in-process fits share, around
the one training step (:mod:`effray.train.step`). The package itself is callable:
``effray.train(model=factory, data=..., epochs=...)`` is :func:`effray.train.api.train`.
"""

from effray.registry import callable_package
from effray.train.api import train as train_api
from effray.train.config import TrainConfig
from effray.train.run import train

__all__ = ["TrainConfig", "train"]

callable_package(__name__, train_api)  # effray.train(model=..., data=..., epochs=...): the Python API
