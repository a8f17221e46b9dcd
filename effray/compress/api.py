"""``effray.compress(...)``: `effray compress` from Python, for a teacher or student that
lives in a notebook.

The keywords are `effray compress`'s flags (``data=``, ``out=``, ``prune_rate=``,
``bits=``...). ``student`` may be a model factory (a picklable callable); ``model`` hands
over the factory (or factories) the ``teacher`` checkpoint names, when it was trained from
one: a file's recorded factory is never imported on its own.
"""

from __future__ import annotations

from typing import Any

from effray.cluster import init_ray
from effray.compress.config import CompressRunConfig
from effray.compress.run import compress as run_compress
from effray.config import from_flags
from effray.train.api import Model, factories, model_reference


def compress(teacher: str, *, student: Model = "", model: Model | list[Model] | None = None, **flags: Any) -> dict:
    """Compress the ``teacher`` checkpoint as `effray compress` does, fine-tuning on Ray Train;
    returns the summary `effray compress` prints (``OUT/metrics.json`` holds the rest).

    Example::

        import effray.compress

        summary = effray.compress(
            "runs/teacher/model.pt", model=net, student=small_net, data="runs/imagenette", out="runs/small",
            prune_rate=0.5, prune_kind="structured", bits=4, kd_alpha=0.7, workers=1,
        )
    """
    factories(model)
    cfg = from_flags(CompressRunConfig, {"teacher": teacher, "student": model_reference(student), **flags})
    init_ray()
    return run_compress(cfg)
