"""Compression that really shrinks and speeds up a model, and says what it really is.

* :mod:`~effray.compress.prune`: importance / schedule / application registries; exact
  global unstructured zeros; structured channel removal (Torch-Pruning) that keeps
  residual networks valid; :func:`prune_step` between fine-tuning epochs.
* :mod:`~effray.compress.quantize`: 2-8 bit fake quantization of every conv and linear
  (QAT/PTQ), BN folding; :mod:`~effray.compress.int8`: real int8 CPU execution.
* :mod:`~effray.compress.distill`: Hinton KD loss.
* :mod:`~effray.compress.pack` + :mod:`~effray.compress.artifact`: bit-packed, sparse,
  self-describing artifacts (``format: effray.compressed``) that load with nothing else.
* :mod:`~effray.compress.measure`: accuracy, params, MACs, bytes, latency, ratios.
* :mod:`~effray.compress.steps`: the recipe's steps in order, as free functions;
  :mod:`~effray.compress.progress`: a fine-tune in progress as a checkpoint.
* :mod:`~effray.compress.recipe`: the steps as hooks on the one training loop, and the
  whole recipe in-process; :mod:`~effray.compress.worker` / :mod:`~effray.compress.run`:
  the same on Ray Train workers, and `effray compress`'s driver.

The package itself is callable: ``effray.compress(teacher, data=..., out=..., bits=4)`` is
:func:`effray.compress.api.compress`, the Python API of `effray compress`.

Importing the package registers its checkpoint formats (the artifact, a fine-tune in
progress) with the one loader, :func:`effray.train.checkpoint.load_checkpoint`.
"""

from effray.compress.api import compress as compress_api
from effray.compress.artifact import FORMAT, load_artifact, save_artifact
from effray.compress.config import CompressConfig
from effray.compress.distill import kd_loss
from effray.compress.int8 import to_int8
from effray.compress.measure import measure
from effray.compress.progress import PROGRESS_FORMAT
from effray.compress.prune import (
    IMPORTANCES,
    PRUNERS,
    lock_sparsity,
    prune_step,
    weight_sparsity,
)
from effray.compress.quantize import QUANTIZERS, calibrate, dequantize, fold_bn, quantize_model
from effray.compress.schedule import SCHEDULES, schedule_rates
from effray.registry import callable_package

__all__ = [
    "FORMAT",
    "PROGRESS_FORMAT",
    "IMPORTANCES",
    "PRUNERS",
    "QUANTIZERS",
    "SCHEDULES",
    "CompressConfig",
    "calibrate",
    "dequantize",
    "fold_bn",
    "kd_loss",
    "load_artifact",
    "lock_sparsity",
    "measure",
    "prune_step",
    "quantize_model",
    "save_artifact",
    "schedule_rates",
    "to_int8",
    "weight_sparsity",
]

callable_package(__name__, compress_api)  # effray.compress(teacher, data=..., out=...): the Python API
