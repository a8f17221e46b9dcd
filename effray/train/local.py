"""A classifier trained in one process on decoded arrays: for the jobs that need a model of
their own and not a Ray Train run (a search's teacher in the benches, the cleaning step's
cross-validation folds, each a Tune trial). The recipe is the benches' teacher: SGD with
Nesterov momentum, a one-cycle LR, crop+flip augmentation drawn per (seed, epoch, batch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from effray.data.arrays import Arrays, epoch_batches
from effray.models import build_model
from effray.train.checkpoint import data_summary, train_payload
from effray.train.parallel import make_strategy, prepare_model
from effray.train.recipe import Hooks, Plan, Run, run_recipe
from effray.train.session import LocalSession


class ArrayHooks(Hooks):
    """The benches' teacher recipe on the loop: SGD with Nesterov momentum and weight decay
    on every parameter, a one-cycle LR, cross-entropy, ``epoch_batches`` of the arrays."""

    def __init__(self, arrays: Arrays, meta: dict[str, Any], batch_size: int, peak_lr: float, total: int, **how: Any):
        self.arrays, self.meta, self.batch_size, self.peak_lr, self.total, self.how = (
            arrays,
            meta,
            batch_size,
            peak_lr,
            total,
            how,
        )

    def optimizer(self, run: Run, state: dict[str, Any] | None = None) -> tuple[Any, Any]:
        opt = torch.optim.SGD(
            run.model.parameters(), lr=self.peak_lr / 2, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, self.peak_lr, total_steps=self.total)

    def batches(self, run: Run, epoch: int) -> Iterable[dict[str, Any]]:
        for x, y in epoch_batches(self.arrays, self.meta, self.batch_size, epoch=epoch, device=run.device, **self.how):
            yield {"image": x, "label": y}


def fit_arrays(
    arrays: Arrays,
    meta: dict[str, Any],
    *,
    epochs: int,
    model: str = "convnet",
    width: float = 0.5,
    batch_size: int = 128,
    peak_lr: float = 0.1,
    seed: int = 0,
    device: Any = "cpu",
    policy: str = "standard",
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """A ``model`` trained ``epochs`` epochs on ``arrays`` (built under ``seed``), in this
    process on the one training loop; the loss stays on ``device`` and is never read (no
    host read at all)."""
    torch.manual_seed(seed)
    net = build_model(model, int(meta["num_classes"]), int(meta["image_shape"][2]), width)
    steps = -(-len(arrays["label"]) // batch_size)
    report = None if on_epoch is None else lambda end: on_epoch(end.epoch)
    session = LocalSession(device, on_epoch=report)
    strategy = make_strategy("ddp", session.device, channels_last=False, compile=False, amp=False)
    run = Run(session, strategy, prepare_model(net, strategy))
    hooks = ArrayHooks(arrays, meta, batch_size, peak_lr, max(1, epochs * steps), policy=policy, seed=seed)
    run.optimizer, run.scheduler = hooks.optimizer(run)
    run_recipe(run, Plan(epochs=epochs, steps_per_epoch=steps, measure=False), hooks)
    return run.plain.eval()


def fitted_payload(
    model: nn.Module, meta: dict[str, Any], epochs: int, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A training checkpoint of a :func:`fit_arrays` model: ``effray evaluate``, compression
    and the search load it like a Ray Train run's."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return train_payload(
        model_state=state,
        model_spec=model.spec,
        optimizer={},
        scheduler={},
        epoch=epochs,
        config=config or {},
        data=data_summary(meta),
        history=[],
        provenance={},
        elapsed_s=0.0,
    )
