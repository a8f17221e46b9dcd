"""``effray.search(...)``: `effray tune` from Python. The keywords are its flags (``data=``,
``space=``, ``num_samples=``...); ``model`` hands over the factories the teacher checkpoint
(and the space's students) name, when they are Python factories of a notebook."""

from __future__ import annotations

from typing import Any

from effray.cluster import init_ray
from effray.config import from_flags
from effray.search.config import TuneConfig
from effray.search.driver import tune_compression
from effray.train.api import Model, factories


def search(teacher: str, *, model: Model | list[Model] | None = None, **flags: Any) -> dict[str, Any]:
    """Search the compression space of the ``teacher`` checkpoint as `effray tune` does;
    returns the summary it prints (the experiment, its trials, the front)."""
    factories(model)
    cfg = from_flags(TuneConfig, {"teacher": teacher, **flags})
    init_ray()
    return tune_compression(cfg)
