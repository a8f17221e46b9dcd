"""The parallel strategies by name: the one module that knows DDP and the pipeline both.

:mod:`effray.train.strategy` (the base class and DDP) and :mod:`effray.train.pipeline`
(which subclasses it) never import each other's registrations; the loop, the drivers and
the other stages pick a strategy here by its ``--parallel`` name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effray.registry import Registry
from effray.train.pipeline import PipelineStrategy
from effray.train.strategy import DDPStrategy, Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("parallel strategy")
STRATEGIES.register("ddp")(DDPStrategy)
STRATEGIES.register("pipeline")(PipelineStrategy)


def make_strategy(name: str, device: torch.device, **kwargs: Any) -> Strategy:
    """The registered strategy ``name`` for this worker's device."""
    return STRATEGIES.get(name)(device, **kwargs)


def prepare_model(model: nn.Module, strategy: Strategy) -> nn.Module:
    """``strategy.prepare(model)``: the one seam between the loop and the parallelism."""
    return strategy.prepare(model)
