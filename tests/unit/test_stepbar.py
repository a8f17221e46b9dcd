"""Rank 0's per-step bar: what the training loop hands it (steps, images/s, the running
loss) and what the terminal shows. Its CUDA path (the loss read without waiting for the
device) is in tests/fake_cuda; the relay to a Ray Train run's driver in
tests/integration/test_image_size.py."""

from __future__ import annotations

import pytest
import torch

from effray.console import StepBars, StepState
from effray.train import stepbar
from effray.train.parallel import make_strategy, prepare_model
from effray.train.recipe import Hooks, Plan, Run, run_recipe
from effray.train.session import LocalSession


class Tiny(Hooks):
    """Four steps of 8 rows a epoch on a linear model: the loop with nothing else."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]

    def optimizer(self, run, state=None):
        opt = torch.optim.SGD(run.model.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    def batches(self, run, epoch):
        return [{"image": x, "label": y} for x, y in self.data]


def fit(progress, epochs: int = 2) -> Run:
    torch.manual_seed(0)
    strategy = make_strategy("ddp", torch.device("cpu"), channels_last=False, compile=False, amp=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    run = Run(LocalSession(), strategy, prepare_model(model, strategy))
    hooks = Tiny()
    run.optimizer, run.scheduler = hooks.optimizer(run)
    return run_recipe(run, Plan(epochs=epochs, steps_per_epoch=4, progress=progress), hooks)


def test_every_step_of_an_epoch_past_the_delay_reaches_the_bar_with_the_running_loss(monkeypatch):
    monkeypatch.setattr(stepbar, "STEP_BAR_DELAY_S", 0.0)
    monkeypatch.setattr(stepbar, "STEP_BAR_EVERY_S", 0.0)
    states: list[StepState] = []
    run = fit(states.append)
    assert [(s.desc, s.step, s.done) for s in states] == [
        *[("epoch 1/2", k, False) for k in (1, 2, 3, 4)],
        ("epoch 1/2", 4, True),
        *[("epoch 2/2", k, False) for k in (1, 2, 3, 4)],
        ("epoch 2/2", 4, True),
    ]
    assert all(s.total == 4 and s.images_per_s > 0 for s in states)
    # the bar's last loss is the epoch's mean loss the loop reports
    for epoch, last in zip(run.history, (states[4], states[9])):
        assert last.loss == pytest.approx(epoch["train_loss"], rel=1e-9)


def test_an_epoch_shorter_than_the_delay_shows_no_bar():
    states: list[StepState] = []
    fit(states.append, epochs=1)  # four tiny steps: far under STEP_BAR_DELAY_S
    assert states == []


def test_the_terminal_bar_shows_steps_rate_and_loss_and_goes_when_the_epoch_ends(capsys):
    bars = StepBars()
    bars.show(StepState("epoch 3/10", 5, 20, 1234.5, None))
    bars.show(StepState("epoch 3/10", 12, 20, 1500.0, 1.23456))
    assert bars.bar.n == 12
    bars.show(StepState("epoch 3/10", 20, 20, 1510.0, 1.2, done=True))
    assert bars.bar is None
    bars.show(StepState("epoch 4/10", 1, 20, 900.0, 1.1))  # the next epoch: a new bar
    assert bars.desc == "epoch 4/10"
    bars.close()
    out = capsys.readouterr().out
    assert "epoch 3/10" in out and "12/20" in out and "1,500 img/s, loss 1.2346" in out and "loss ..." in out
