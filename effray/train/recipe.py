"""The one per-worker recipe loop, for `effray train` and `effray compress` alike.

torchtune's shape, top to bottom: an entry point sets up a :class:`Run` (the model as its
Strategy prepared it, the optimizer, where a resumed run goes on from), :func:`run_recipe` trains
the epochs, and the entry point saves what it made. What differs between recipes is a
:class:`Hooks` object the loop calls at fixed points:

* ``before_epoch``: structural events (compression prunes or quantizes here). When they
  replace parameters the loop re-prepares the model (a new DDP wrapper and buckets) and
  rebuilds the optimizer with ``optimizer``;
* ``batches`` and ``on_device``: the epoch's batches (Ray Train's exact shuffle or shard,
  or an in-process callable) and what happens to each on the device (GPU augmentation);
* ``loss``: cross-entropy with label smoothing, or KD against a frozen teacher;
* ``validate``: exact all-reduced validation (:mod:`effray.train.validate`), or nothing;
* ``after_epoch``: report and checkpoint through the :class:`~effray.train.session.Session`
  (rank 0 writes);
* ``at_end``: finish (compression's PTQ).

The same loop runs on W Ray Train workers and at world 1 in this process (a Tune trial, a
bench, a cleaning fold). Per step the loss and row count are summed on the device; each
epoch reads them on the host once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effray.models.airbench import whitening_biases
from effray.train.faults import InjectedFailure
from effray.train.parallel import prepare_model
from effray.train.session import EpochEnd, Session, seed_epoch
from effray.train.step import Lookahead, train_step
from effray.train.stepbar import EpochBar, Sink
from effray.train.strategy import Strategy


@dataclass(frozen=True)
class Plan:
    """How long the loop runs and which of its options are on (all off by default)."""

    epochs: int
    steps_per_epoch: int  # optimizer steps per epoch, for schedules that span the run
    seed: int | None = None  # reseed every RNG from (seed, epoch, rank) each epoch; None: the caller's RNG runs on
    micro_batch: int | None = None  # at most this many rows per forward (elastic: a batch accumulated in chunks)
    whiten_bias_epochs: int = 0  # airbench: the whitening stem's bias trains for these epochs only (0 = always)
    failure: InjectedFailure = InjectedFailure()  # --inject-failure-at-epoch
    measure: bool = True  # read the epoch's loss on the host and validate; off when nothing reads them
    progress: Sink | None = None  # where rank 0's per-step bar goes (effray.train.stepbar); None: no bar


@dataclass
class Run:
    """What the loop and its hooks share while one recipe runs (in one process)."""

    session: Session
    strategy: Strategy
    model: nn.Module  # as the strategy prepared it (a DDP wrapper, a pipeline stage, the module itself)
    optimizer: Any = None
    scheduler: Any = None  # stepped after every optimizer step; ``last_epoch`` counts the steps
    lookahead: Lookahead | None = None  # airbench's EMA of the weights, over the whole run's steps
    start: int = 0  # the first epoch this attempt trains (a resumed run's epochs done)
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of epochs before this one, across attempts
    epoch_times: list[float] = field(default_factory=list)  # this attempt's
    nodes: list[str] = field(default_factory=list)  # the node of every rank (Ray's ids; none in-process)

    @property
    def plain(self) -> nn.Module:
        """The user's module inside whatever the strategy wrapped it in."""
        return self.strategy.unwrap(self.model)

    @property
    def device(self) -> torch.device:
        return self.session.device

    def prepare(self, module: nn.Module) -> None:
        """``module`` prepared afresh (its parameters changed: DDP needs new buckets)."""
        self.model = prepare_model(module.to(self.device), self.strategy)


class Hooks:
    """What a recipe adds to the loop. The defaults: no events, cross-entropy on the labels,
    no validation, each epoch reported with no checkpoint."""

    def optimizer(self, run: Run, state: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """``(optimizer, scheduler)`` over ``run``'s parameters; ``state``: a resumed run's."""
        raise NotImplementedError

    def batches(self, run: Run, epoch: int) -> Iterable[dict[str, Any]]:
        """One epoch of this replica's batches: dicts with at least "image" and "label"."""
        raise NotImplementedError

    def before_epoch(self, run: Run, epoch: int) -> bool:
        """Events before ``epoch`` trains; True when they replaced parameters."""
        return False

    def on_device(self, run: Run, batch: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
        """A batch as the step takes it (``--augment-on gpu`` augments it here)."""
        return batch

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(logits, batch["label"].to(logits.device, non_blocking=True))

    def validate(self, run: Run, epoch: int) -> dict[str, Any]:
        """Validation metrics after ``epoch`` (``val_*``), or none."""
        return {}

    def after_epoch(self, run: Run, epoch: int, metrics: dict[str, Any]) -> None:
        run.history.append(metrics)
        run.session.report(EpochEnd(epoch, metrics, run.plain))

    def at_end(self, run: Run) -> None:
        """After the last epoch (also when there was none to train)."""


def run_recipe(run: Run, plan: Plan, hooks: Hooks) -> Run:
    """Train ``run`` from ``run.start`` to ``plan.epochs`` epochs, calling ``hooks``; ``run``
    must hold its optimizer already (a resumed one's state loaded)."""
    session, strategy = run.session, run.strategy
    rank, world = session.rank, session.world
    replicas = strategy.data_rank(rank, world)[1]
    steps = plan.steps_per_epoch
    run.nodes = session.nodes()  # collective: every rank calls it here
    lookahead = run.lookahead
    whiten = whitening_biases(run.plain)
    for epoch in range(run.start, plan.epochs):
        if hooks.before_epoch(run, epoch):
            run.prepare(run.plain)
            run.optimizer, run.scheduler = hooks.optimizer(run)
        if plan.seed is not None:
            seed_epoch(plan.seed, epoch, rank)
        run.model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64, device=strategy.reduce_device)
        waited, asked = 0.0, time.perf_counter()  # time blocked on the input pipeline
        batches = strategy.batches(lambda epoch=epoch: hooks.batches(run, epoch))
        if lookahead is not None:
            lookahead.begin_epoch(run.plain, epoch * steps)
        frozen = whiten if epoch >= plan.whiten_bias_epochs > 0 else ()
        bar = None
        if plan.progress is not None and rank == 0:
            bar = EpochBar(plan.progress, f"epoch {epoch + 1}/{plan.epochs}", steps, sums, replicas)
        for step, batch in enumerate(batches):
            waited += time.perf_counter() - asked
            batch = hooks.on_device(run, batch, epoch, step)
            train_step(
                strategy, run.model, run.optimizer, run.scheduler, batch, hooks.loss, sums, plan.micro_batch, frozen
            )
            if lookahead is not None:
                lookahead.after_step(run.plain, epoch * steps + step + 1)
            plan.failure.maybe_die(epoch, step, rank, world)
            if bar is not None:
                bar.step(len(batch["label"]))
            asked = time.perf_counter()
        if lookahead is not None:
            lookahead.end_epoch(run.plain)
        if bar is not None:
            bar.end()
        if not plan.measure:
            hooks.after_epoch(run, epoch, {"epoch": epoch + 1})
            continue
        sums = strategy.sum_replicas(torch.cat([sums, sums.new_tensor([waited])])).cpu()  # the epoch's host read
        train_s = time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(sums[0] / max(sums[1], 1)),
            "images_per_s": float(sums[1]) / train_s,
            "lr": run.optimizer.param_groups[0]["lr"],
            "data_wait_s": float(sums[2]) / replicas,
            "nodes": run.nodes,
            "world": world,
            "train_rows": int(sums[1]),
            "optimizer_steps": run.scheduler.last_epoch,
        }
        metrics.update(hooks.validate(run, epoch))
        run.epoch_times.append(time.perf_counter() - t0)
        run.elapsed += run.epoch_times[-1]
        metrics.update(epoch_s=run.epoch_times[-1], elapsed_s=run.elapsed)
        hooks.after_epoch(run, epoch, metrics)
    hooks.at_end(run)
    return run
