"""Rank 0's per-step bar of a training epoch: steps, images/s and the running loss.

An epoch of 224 px images runs for minutes; its epoch line comes at the end. So once an
epoch has run :data:`~effray.console.STEP_BAR_DELAY_S`, rank 0 hands a
:class:`~effray.console.StepState` to a sink every :data:`~effray.console.STEP_BAR_EVERY_S`:
the terminal's bar in this process, or the driver's through its relay actor
(:func:`effray.console.relayed_step_bars`), since a Ray Train worker's output goes to Ray's
log. The loss is the loop's device sums, read without waiting for the device
(:class:`RunningLoss`): the bar costs the training step nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from effray.console import STEP_BAR_DELAY_S, STEP_BAR_EVERY_S, StepState

Sink = Callable[[StepState], None]


def new_event() -> Any:
    """A CUDA event (the seam the fake-CUDA tests replace: a real one needs a driver)."""
    return torch.cuda.Event()


class RunningLoss:
    """Rank 0's mean loss so far in the epoch, from the loop's device sums ``(loss x rows,
    rows)``. On the CPU they are read as they are. On a GPU each read starts a non-blocking
    copy to (pinned) host memory and records an event; a later read takes that copy's value
    once the event says the device got there. So the host never waits for the GPU, and the
    bar's loss is at most one refresh old (None before the first copy lands)."""

    def __init__(self, sums: torch.Tensor) -> None:
        self.sums, self.on_host = sums, sums.device.type == "cpu"
        self.pending: tuple[torch.Tensor, Any] | None = None
        self.last: float | None = None

    def value(self) -> float | None:
        if self.on_host:
            return float(self.sums[0]) / max(float(self.sums[1]), 1.0)
        if self.pending is not None and self.pending[1].query():
            host = self.pending[0]
            self.last, self.pending = float(host[0]) / max(float(host[1]), 1.0), None
        if self.pending is None:
            copy = self.sums.to("cpu", non_blocking=True)
            event = new_event()
            event.record()
            self.pending = (copy, event)
        return self.last


class EpochBar:
    """One epoch of rank 0's steps for ``sink``: nothing until the epoch has run
    ``delay_s``, then a state at most every ``every_s``, and a last one (``done``) when the
    epoch ends if any was shown. Images/s counts every replica's rows (``replicas`` x rank
    0's, which takes as many as any other)."""

    def __init__(
        self,
        sink: Sink,
        desc: str,
        total: int,
        sums: torch.Tensor,
        replicas: int = 1,
        delay_s: float | None = None,
        every_s: float | None = None,
    ) -> None:
        self.sink, self.desc, self.total, self.replicas = sink, desc, total, replicas
        self.loss = RunningLoss(sums)
        self.every_s = STEP_BAR_EVERY_S if every_s is None else every_s
        self.t0 = time.perf_counter()
        self.next = self.t0 + (STEP_BAR_DELAY_S if delay_s is None else delay_s)
        self.steps = self.rows = 0
        self.shown = False

    def step(self, rows: int) -> None:
        """After each optimizer step (``rows``: this rank's rows in it)."""
        self.steps, self.rows = self.steps + 1, self.rows + rows
        now = time.perf_counter()
        if now < self.next:
            return
        self.next, self.shown = now + self.every_s, True
        self.sink(self.state(now))

    def state(self, now: float, done: bool = False) -> StepState:
        rate = self.rows * self.replicas / max(now - self.t0, 1e-9)
        return StepState(self.desc, self.steps, self.total, rate, self.loss.value(), done)

    def end(self) -> None:
        if self.shown:
            self.sink(self.state(time.perf_counter(), done=True))
