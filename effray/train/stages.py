"""Where a pipeline cuts the model, and which rank does what.

Stage boundaries: explicit ``--split-points``, or balanced (the smallest maximum stage) by
parameter count or by forward+backward time measured per block. The mesh: rank ``r`` is
stage ``r % S`` of pipeline (replica) ``r // S``. The data: Ray Train's "train" split cut
into one shard per pipeline, given to its stage-0 rank only. Used by
:class:`effray.train.pipeline.PipelineStrategy` and checked on the driver before a worker
starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effray.errors import EffrayError

PIPELINE_SCHEDULES = ("gpipe", "1f1b")


def parse_split_points(text: str) -> list[int]:
    """``"3,7"`` -> ``[3, 7]`` (block indices where stages 2, 3... start)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise EffrayError(f"--split-points must be comma-separated block indices like 3,7, got {text!r}") from None


def balanced_split(costs: list[float], stages: int) -> list[int]:
    """Boundaries ``[0, b1, ..., n]`` cutting ``costs`` (one per block) into ``stages``
    contiguous non-empty parts with the smallest maximum part (linear-partition DP)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise EffrayError(f"can't cut {n} blocks into {stages} stages")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], pre[j] - pre[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds, j = [n], n
    for k in range(stages, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


def block_costs(model: nn.Sequential, by: str = "params", sample: torch.Tensor | None = None) -> list[float]:
    """Per-block cost: parameter count (+1, so parameter-free blocks still weigh), or
    measured forward+backward seconds on ``sample`` (``by="time"``), on ``sample``'s
    device. Blocks visit that device one at a time (as copies), so a model too big for
    one device (the reason to pipeline it) can still be measured."""
    if by == "params":
        return [1.0 + sum(p.numel() for p in b.parameters()) for b in model]
    if by != "time":
        raise EffrayError(f"--split-by must be params or time, got {by!r}")
    import copy
    import time

    if sample is None:
        raise EffrayError("splitting by time needs a sample batch")
    device = sample.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    costs, x = [], sample
    for block in model:
        # a copy in training mode: the real block's BatchNorm statistics stay untouched
        b = copy.deepcopy(block).to(device).train()
        x = x.detach().requires_grad_()
        for repeat in range(4):  # the first is a warm-up (allocator, kernels, caches)
            if repeat == 1:
                sync()
                t0 = time.perf_counter()
            y = b(x)
            y.float().sum().backward()
        sync()
        costs.append((time.perf_counter() - t0) / 3)
        x = y.detach()
        del b
    return costs


def stage_bounds(
    model: nn.Sequential, stages: int, split_points: str = "", by: str = "params", sample: torch.Tensor | None = None
) -> list[int]:
    """Stage boundaries for ``model``: explicit ``split_points`` when given, else balanced."""
    n = len(model)
    if split_points:
        pts = parse_split_points(split_points)
        if len(pts) != stages - 1 or pts != sorted(set(pts)) or not all(0 < p < n for p in pts):
            raise EffrayError(
                f"--split-points {split_points} must be {stages - 1} increasing block indices in 1..{n - 1}"
            )
        return [0, *pts, n]
    return balanced_split(block_costs(model, by, sample), stages)


@dataclass(frozen=True)
class Mesh:
    """Where a rank sits: ``stage = rank % S``, ``replica = rank // S``."""

    rank: int
    world: int
    stages: int

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    @property
    def replicas(self) -> int:
        return self.world // self.stages

    def pipeline_ranks(self, replica: int) -> list[int]:
        return [replica * self.stages + s for s in range(self.stages)]

    def dp_ranks(self, stage: int) -> list[int]:
        return [p * self.stages + stage for p in range(self.replicas)]


def pipeline_data_config() -> Any:
    """The ``ray.train.DataConfig`` subclass a pipeline run splits its data with (built
    on first use: Ray Train is imported on the workers and the driver only)."""
    import ray.train

    class PipelineDataConfig(ray.train.DataConfig):
        """ "train" cut into one shard per pipeline (world // stages), given to each
        pipeline's stage-0 rank; other ranks get ``None`` for it. Other datasets
        ("val") go whole to every rank, as for DDP."""

        def __init__(self, stages: int, **kw: Any) -> None:
            super().__init__(**kw)
            self.stages = stages

        def configure(
            self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any
        ) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                if name == "train":
                    d = world_size // self.stages
                    hints = (
                        [worker_node_ids[p * self.stages] for p in range(d)]
                        if worker_node_ids and self._enable_shard_locality
                        else None
                    )
                    for p, split in enumerate(ds.streaming_split(d, equal=True, locality_hints=hints)):
                        for s in range(self.stages):
                            out[p * self.stages + s][name] = split if s == 0 else None
                else:
                    for i in range(world_size):
                        out[i][name] = ds.iterator()
            return out

    return PipelineDataConfig
