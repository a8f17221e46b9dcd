"""The training step and its parts: LR schedule, weight-decay groups, lookahead, the loss.

One optimizer step (:func:`train_step`) is the same for `effray train`, compression's
fine-tune and the in-process fits: the loop around it is :mod:`effray.train.recipe`, and
parallelism is the Strategy's job (:mod:`effray.train.strategy`). Nothing here reads a
value back to the host: losses are summed into a device tensor the epoch reads once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from effray.train.strategy import Strategy


class Schedule:
    """LR multiplier per optimizer step. A callable object (not a lambda) so LambdaLR's
    state_dict round-trips through a weights-only checkpoint."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, start: float = 0.1, end: float = 0.0) -> None:
        self.kind, self.total, self.warmup = kind, max(1, total_steps), max(0, min(warmup_steps, total_steps))
        self.start, self.end = start, end  # multipliers at step 0 and at the last step (airbench: 0.2, 0.07)

    def __call__(self, step: int) -> float:
        t = min(step, self.total)
        start, end = getattr(self, "start", 0.1), getattr(self, "end", 0.0)  # a checkpoint from before the knobs
        if t < self.warmup:
            return start + (1.0 - start) * t / self.warmup
        rest = (t - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * rest))
        return 1.0 - (1.0 - end) * rest  # one-cycle: linear up, linear down to `end`


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float | None = None,
    bias_lr_scale: float = 1.0,
    decay_biases: bool = False,
) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases just
    fights the normalisation (1-D tensors are exactly those). ``bias_lr_scale`` != 1
    moves the norm layers' parameters to a third group at ``lr * bias_lr_scale``
    (airbench: 64x on BatchNorm biases). ``decay_biases`` decays the 1-D tensors too, at
    the weights' rate per step (their group's decay divided by its lr multiplier), as
    airbench does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    bias_decay = weight_decay if decay_biases else 0.0
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": bias_decay}]
    if bias_lr_scale == 1.0:
        return groups  # two groups, as checkpoints from before the knob hold
    if lr is None:
        raise ValueError("bias_lr_scale needs the base lr")
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters() if p.requires_grad}
    groups[1]["params"] = [p for p in no_decay if id(p) not in norm_ids]
    groups.append(
        {
            "params": [p for p in no_decay if id(p) in norm_ids],
            "weight_decay": bias_decay / bias_lr_scale,
            "lr": lr * bias_lr_scale,
        }
    )
    return groups


class Lookahead:
    """airbench's lookahead (after hlb-CIFAR10): from ``start`` of the run, every ``every``
    steps the weights (and float buffers) move to an EMA of themselves, whose decay
    ``base**every * progress**power`` grows toward the end: fast steps early, strong
    averaging late. Each epoch ends with weights == EMA, so a checkpoint holds all of the
    state and a resumed run continues exactly (the EMA restarts from the loaded weights)."""

    def __init__(
        self, total_steps: int, every: int = 5, base: float = 0.95, power: float = 3.0, start: float = 0.3
    ) -> None:
        self.total, self.every, self.base, self.power = max(1, total_steps), every, base, power
        self.first = math.ceil(start * self.total)
        self.ema: dict[str, torch.Tensor] | None = None

    def _state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}

    def _start(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {k: v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def begin_epoch(self, module: torch.nn.Module, step: int) -> None:
        """``step``: optimizer steps done before this epoch (a resumed run starts here)."""
        if self.ema is None and step >= self.first:
            self._start(self._state(module))

    @torch.no_grad()
    def after_step(self, module: torch.nn.Module, step: int) -> None:
        """``step``: optimizer steps done so far in the whole run (1-based)."""
        if step < self.first or step % self.every:
            return
        state = self._state(module)
        if self.ema is None:
            self._start(state)
            return
        rho = self.base**self.every * (step / self.total) ** self.power
        for k, e in self.ema.items():
            e.lerp_(state[k], 1.0 - rho)
            state[k].copy_(e)

    @torch.no_grad()
    def end_epoch(self, module: torch.nn.Module) -> None:
        if self.ema is not None:
            for k, v in self._state(module).items():
                v.copy_(self.ema[k])


def soft_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup/cutmix) when the batch has them, else
    against labels; label smoothing either way."""
    if "target" in batch:
        target = batch["target"].to(logits.device).float()
        target = target * (1 - smoothing) + smoothing / logits.shape[1]
        return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return F.cross_entropy(logits, batch["label"].to(logits.device), label_smoothing=smoothing)


def train_step(
    strategy: Strategy,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: dict[str, Any],
    loss_fn: Any,
    sums: torch.Tensor,
    micro: int | None = None,
    frozen: tuple[torch.Tensor, ...] = (),
) -> None:
    """One optimizer step on ``batch``; its loss and row count are added to ``sums`` (on
    the device) instead of being read back, so the host never waits for the GPU here.

    ``micro``: at most this many rows per forward; a larger batch is accumulated over
    chunks (DDP syncs only the last), each chunk's loss weighted by its share, so the
    step equals one over the whole batch (an elastic run on fewer workers).

    ``frozen``: parameters this step leaves alone, momentum and weight decay included
    (their gradients are dropped before the step; DDP has already reduced them, so its
    bookkeeping is untouched, as it would not be by flipping ``requires_grad``)."""
    optimizer.zero_grad(set_to_none=True)
    n = len(batch["label"])
    chunks = [batch] if micro is None or n <= micro else _chunks(batch, micro)
    loss = torch.zeros((), dtype=torch.float64, device=sums.device)
    for i, chunk in enumerate(chunks):

        def weighted(y: torch.Tensor, b: dict[str, Any], share: float = len(chunk["label"]) / n) -> torch.Tensor:
            return loss_fn(y, b) * share

        sync = contextlib.nullcontext() if i == len(chunks) - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss += strategy.forward_backward(model, chunk["image"], chunk, weighted).to(sums.device, torch.float64)
    for p in frozen:
        p.grad = None
    optimizer.step()
    scheduler.step()
    sums[0] += loss * n
    sums[1] += n


def _chunks(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    parts = {
        k: v.split(size) for k, v in batch.items() if torch.is_tensor(v) and v.dim() and len(v) == len(batch["label"])
    }
    return [{**batch, **{k: p[i] for k, p in parts.items()}} for i in range(len(parts["label"]))]
