"""``effray.train(...)``: `effray train` for a model that lives in a notebook.

The keywords are `effray train`'s flags (``data=``, ``epochs=``, ``augment=``...), and
``model`` is a built-in name, a reference, or a model factory: a picklable callable that
returns the ``nn.Module`` (given ``num_classes`` when it takes it). The factory travels to
the Ray Train workers with the run's config; the checkpoint records it as
``module:qualname``, so loading it later takes the same factory again (the API's
``model=``) or, for a factory in an importable module, ``--trust-code``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from effray.cluster import init_ray
from effray.config import from_flags
from effray.models.reference import provide
from effray.train.config import TrainConfig
from effray.train.run import train as run_train

Model = str | Callable[..., nn.Module]


def model_reference(model: Model) -> str:
    """A reference for ``model``: itself when it is one (or a built-in name), else the
    reference of the factory, handed to this process (:func:`effray.models.reference.provide`)."""
    return model if isinstance(model, str) else provide(model)


def factories(models: Model | list[Model] | None) -> None:
    """Hand this process the factories that files it loads name (``model=`` of compress/search)."""
    for m in models if isinstance(models, list) else [models] if models is not None else []:
        model_reference(m)


def train(model: Model = "fastnet", **flags: Any) -> dict[str, Any]:
    """Train ``model`` on Ray Train as `effray train` does, on the Ray this process joined
    (or a private local one); returns the result `effray train` prints as JSON.

    Example::

        import effray.train

        def net(num_classes):
            return torchvision.models.resnet18(num_classes=num_classes)

        result = effray.train(model=net, data="runs/imagenette", epochs=2, workers=1, wandb=False)
        print(result["val_accuracy"], result["checkpoint"])
    """
    cfg = from_flags(TrainConfig, {"model": model_reference(model), **flags})
    init_ray()
    return run_train(cfg)
