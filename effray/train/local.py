"""A classifier trained in one process on decoded arrays: for the jobs that need a model of
their own and not a Ray Train run (a search's teacher in the benches, the cleaning step's
cross-validation folds, each a Tune trial). The recipe is the benches' teacher: SGD with
Nesterov momentum, a one-cycle LR, crop+flip augmentation drawn per (seed, epoch, batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from effray.data.arrays import Arrays, epoch_batches
from effray.models import build_model
from effray.train.checkpoint import data_summary, train_payload


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
    """A ``model`` trained ``epochs`` epochs on ``arrays`` (built under ``seed``); the loss
    stays on ``device``: no host read in a step."""
    torch.manual_seed(seed)
    net = build_model(model, int(meta["num_classes"]), int(meta["image_shape"][2]), width).to(device)
    steps = max(1, epochs * -(-len(arrays["label"]) // batch_size))
    opt = torch.optim.SGD(net.parameters(), lr=peak_lr / 2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, peak_lr, total_steps=steps)
    net.train()
    for epoch in range(epochs):
        for x, y in epoch_batches(arrays, meta, batch_size, policy=policy, seed=seed, epoch=epoch, device=device):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return net.eval()


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
