"""Where a recipe runs: on a Ray Train worker, or in this process.

The loop (:mod:`effray.train.recipe`) is the same in both places; what differs is asked of
its :class:`Session`: this rank and the world's size, the device, the checkpoint to resume
from, and where an epoch's metrics (and checkpoint) go. :class:`RaySession` takes them from
Ray Train (``ray.train.get_context``, ``ray.train.report`` with a checkpoint, the dataset
shards); :class:`LocalSession` is world 1 on a given device, resuming from a payload it was
handed and reporting through a callback (a Tune report, or nothing).

The collectives every worker function shares (sum over ranks, rank 0's integers, the
nodes of every rank, per-epoch seeding) live here too: they are what "a world" means.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from effray.console import say
from effray.data.shuffle import CachedSplit, training_batches
from effray.errors import EffrayError
from effray.train.checkpoint import first_readable, read_payload, save_payload

Payload = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class EpochEnd:
    """One finished epoch, as the loop hands it to its session: the metrics to report, the
    model (the plain module, for an in-process caller that scores it itself) and the
    checkpoint to keep, built only when someone keeps it (rank 0 of a Ray Train run, or an
    in-process callback that asks)."""

    epoch: int  # 0-based: the epoch just trained
    metrics: dict[str, Any]
    model: nn.Module
    payload: Payload | None = None


class Session:
    """World 1 on ``device``: the in-process base the Ray Train session extends."""

    rank: int = 0
    world: int = 1

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def restore(self) -> tuple[str, dict[str, Any]] | None:
        """``(where, payload)`` of the checkpoint to resume from, or None to start afresh."""
        return None

    def report(self, end: EpochEnd, *, name: str | None = None, saved: Callable[[Path], None] | None = None) -> None:
        """Report one epoch; ``name``: the checkpoint's directory name, ``saved(path)``:
        called with the checkpoint file while it exists (to log it elsewhere too)."""

    def nodes(self) -> list[str]:
        """The node of every rank, in rank order (collective)."""
        return []


class LocalSession(Session):
    """In this process (a Tune trial, a bench, a cleaning fold): ``resume`` is the payload
    to go on from, ``on_epoch(end)`` receives every epoch with the model in eval mode."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        resume: dict[str, Any] | None = None,
        on_epoch: Callable[[EpochEnd], None] | None = None,
    ) -> None:
        super().__init__(device)
        self.resume, self.on_epoch = resume, on_epoch

    def restore(self) -> tuple[str, dict[str, Any]] | None:
        return ("the given payload", self.resume) if self.resume is not None else None

    def report(self, end: EpochEnd, *, name: str | None = None, saved: Callable[[Path], None] | None = None) -> None:
        if self.on_epoch is None:
            return
        was = end.model.training
        self.on_epoch(EpochEnd(end.epoch, end.metrics, end.model.eval(), end.payload))
        end.model.train(was)


class RaySession(Session):
    """A Ray Train worker: rank and world from the train context, its device, its run's
    checkpoints and ``ray.train.report``. Only rank 0 writes a checkpoint."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        super().__init__(ray.train.torch.get_device())

    def restore(self) -> tuple[str, dict[str, Any]] | None:
        return restore(self.rank)

    def report(self, end: EpochEnd, *, name: str | None = None, saved: Callable[[Path], None] | None = None) -> None:
        import ray.train

        if end.payload is None or self.rank != 0:
            ray.train.report(end.metrics)
            return
        with tempfile.TemporaryDirectory(prefix="effray-ckpt-") as tmp:
            path = save_payload(tmp, end.payload())
            if saved is not None:
                saved(path)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(end.metrics, checkpoint=checkpoint, **({"checkpoint_dir_name": name} if name else {}))

    def nodes(self) -> list[str]:
        return worker_nodes()

    def dataset(self, name: str) -> Any:
        """This worker's shard of the run's dataset ``name``."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def epochs(
        self,
        source: CachedSplit | None,
        meta: dict[str, Any],
        batch_size: int,
        *,
        replica: int,
        replicas: int,
        clock: str,
        shuffle_buffer: int,
        seed: int,
        **kw: Any,
    ) -> Callable[[int], Iterable[dict[str, Any]]]:
        """``epoch -> batches`` of this replica: the cached split reshuffled exactly every
        epoch when the driver cached it, else the streamed "train" shard
        (:func:`effray.data.shuffle.training_batches`; ``kw``: its torch_batches options)."""
        shard = None if source is not None else self.dataset("train")

        def batches(epoch: int) -> Iterable[dict[str, Any]]:
            return training_batches(
                source,
                shard,
                meta,
                batch_size,
                epoch=epoch,
                replica=replica,
                replicas=replicas,
                clock=clock,
                shuffle_buffer=shuffle_buffer,
                seed=seed,
                **kw,
            )

        return batches


def distributed() -> bool:
    """Whether this process is one rank of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op alone). Gloo reduces CPU tensors, NCCL CUDA ones."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (collective): where a run really ran,
    reported with its metrics so placement across nodes can be checked."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    if not distributed():
        return [me]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, me)
    return [str(n) for n in nodes]


def from_rank0(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's integers on every rank (start epoch, attempt token): ranks must agree."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if distributed():
        dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Re-derive every RNG from (seed, epoch, rank) so a resumed epoch draws the same
    numbers as an uninterrupted run would have."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    random.seed(s)


def restore(rank: int) -> tuple[str, dict[str, Any]] | None:
    """The newest readable checkpoint Ray knows for this run (after a restart, or a re-run
    of the same --storage/--name), falling back to older ones when the newest is corrupt."""
    import ray.train

    if ray.train.get_checkpoint() is None:
        return None
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
    )
    order = sorted(enumerate(reported), key=lambda ic: (ic[1].metrics.get("epoch", 0), ic[0]), reverse=True)
    by_path = {r.checkpoint.path: r.checkpoint for _, r in order} or {
        ray.train.get_checkpoint().path: ray.train.get_checkpoint()
    }
    paths = list(by_path)

    def read(path: str) -> dict[str, Any]:
        with by_path[path].as_directory() as d:  # no copy on local storage
            return read_payload(d)

    try:
        return first_readable(paths, read=read)
    except EffrayError:
        if rank == 0:
            say(f"[effray] no readable checkpoint among {len(paths)}; starting from scratch")
        return None
