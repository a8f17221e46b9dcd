"""Parallelism strategies: how a model is placed, stepped and saved across Ray Train workers.

The training loop never touches DDP directly; it asks a :class:`Strategy` to prepare the
model, run forward+backward on a batch, predict, and hand back a plain state dict. The
base class and DDP live here; pipeline parallelism (:mod:`effray.train.pipeline`)
subclasses it behind the same methods, plus its own Ray Data split
(:meth:`Strategy.dataset_config`). :mod:`effray.train.parallel` names them both.

Device rule: every tensor a step touches lives on ``self.device`` (the model's); sums
that cross ranks stay there too and are read on the host once per epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from effray.hardware import bf16_native
from effray.models.predict import autocast, logits

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def ingest_options(train_ds: Any = None) -> Any:
    """Ray Train's ingest options for "train": order preserved (a seeded run deals the
    same rows to the same rank), and the stream's object-store budget the dataset was
    built with (:func:`effray.data.pipeline.data_context`), which Train would drop."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    if train_ds is not None:
        options.resource_limits = train_ds.context.execution_options.resource_limits
    return options


class Strategy:
    """Data-parallel by default; subclasses override what differs."""

    name = "base"

    def __init__(self, device: torch.device, *, channels_last: bool, compile: bool, amp: bool, **_: Any) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        # channels-last helps convs on tensor cores and in oneDNN on x86 CPUs alike; bf16
        # autocast only where the hardware has native bf16 math, since emulated bf16 is
        # slower than fp32
        self.channels_last = channels_last
        self.amp = amp and bf16_native(device)
        self.compile = compile
        # where cross-rank sums live: gloo reduces CPU tensors, NCCL only CUDA ones
        self.reduce_device = device

    @classmethod
    def dataset_config(cls, cfg: Any = None, train_ds: Any = None) -> Any:
        """How Ray Train hands datasets to workers.

        Only "train" is split: Ray's split is ``equal=True`` and drops the remainder rows,
        so validation reads the whole split on every rank and each rank scores its own
        rows (``index % world == rank``). Order is preserved: the splitter then deals
        the same rows to the same rank every run, so a seeded CPU run repeats exactly."""
        import ray.train

        return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": ingest_options(train_ds)})

    def prepare(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def data_rank(self, rank: int, world: int) -> tuple[int, int]:
        """(which data replica this rank is, how many): each DDP rank is its own."""
        return rank, world

    def batches(self, make: Callable[[], Any]) -> Any:
        """This rank's training batches for one epoch (a pipeline feeds later stages itself)."""
        return make()

    def sum_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Sum per-replica tallies (loss, counts) over replicas; for DDP, over all ranks."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state to checkpoint (called on every rank; rank 0's is saved)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp)

    def numerics(self) -> dict[str, bool]:
        """What the model actually ran with, saved in checkpoints so that evaluation
        repeats it (and reproduces the reported accuracy) on any machine."""
        return {"bf16": self.amp, "channels_last": self.channels_last}

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def forward_backward(
        self, model: nn.Module, images: torch.Tensor, batch: dict[str, torch.Tensor], loss_fn: LossFn
    ) -> torch.Tensor:
        """One micro-step: loss on this rank's batch, gradients left on the parameters
        (all-reduced by DDP's hooks during backward). Returns the detached loss."""
        loss = loss_fn(logits(model, images, self.device, self.numerics()), batch)
        loss.backward()
        return loss.detach()

    def sync_for_eval(self, model: nn.Module) -> None:
        """Make every rank's model identical to rank 0's (the one checkpointed) before
        validation. Parameters already are under DDP; BatchNorm running stats are not:
        each rank updated them in its own last forward."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for buf in unwrap(model).buffers():
                dist.broadcast(buf.data, src=0)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits from the plain module: DDP's forward broadcasts buffers (a collective),
        and ranks score different numbers of validation batches."""
        return logits(unwrap(model), images, self.device, self.numerics())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The plain module's weights on CPU, whatever wraps it (DDP, torch.compile)."""
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap(model)


class DDPStrategy(Strategy):
    """DistributedDataParallel via ``ray.train.torch.prepare_model`` (NCCL or gloo, as the
    TorchConfig set up the process group; no wrapping with one worker). Outside a process
    group (an in-process fit, a Tune trial) the model just moves to the device."""

    name = "ddp"

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist.is_available() and dist.is_initialized():
            import ray.train.torch

            model = ray.train.torch.prepare_model(model, move_to_device=self.device, parallel_strategy="ddp")
        else:
            model = model.to(self.device)
        # compile the DDP-wrapped module so DDP's optimizer splits graphs at bucket boundaries
        return torch.compile(model) if self.compile else model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
