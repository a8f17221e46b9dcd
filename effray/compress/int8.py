"""Real int8 execution on CPU: FX graph-mode post-training quantization (x86 backend).

torchao and the PT2E flow (``torch.ao.quantization.quantize_pt2e``) are not in this
torch build; FX graph mode (``prepare_fx``/``convert_fx``) is, and it handles what eager
mode can't without model edits: the residual add (quantized ``add_relu``), conv+BN+ReLU
fusion and the quant/dequant boundaries. The result runs fbgemm/oneDNN int8 kernels
(VNNI on AVX-512 machines) with no compiler in the loop, so there is no compile time to
separate from latency.

The float twin of a fake-quantized model (:func:`~effray.compress.quantize.dequantize`)
is what gets converted: at 8 bits its per-channel grid is the one QAT trained on; at fewer
bits the k-bit values are re-expressed on the int8 grid (a superset when 127 is a
multiple of 2^(k-1)-1, i.e. k = 2 and 8; otherwise within half an int8 step).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from effray.compress.quantize import dequantize, is_quantized
from effray.config import require

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
ENGINES = ("x86", "fbgemm", "onednn")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():  # torch.ao announces its move to torchao on every call
        warnings.simplefilter("ignore")
        yield


@torch.no_grad()
def to_int8(model: nn.Module, batches: Batches, *, engine: str = "x86", max_batches: int = 8) -> nn.Module:
    """An int8 ``GraphModule`` of ``model`` (left untouched), activations calibrated on up to
    ``max_batches`` of ``batches``. Sets ``torch.backends.quantized.engine`` (process-wide:
    the kernels are chosen at run time)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    require(engine in torch.backends.quantized.supported_engines and engine in ENGINES,
            f"int8 engine {engine!r} is not available here; supported: {', '.join(torch.backends.quantized.supported_engines)}")  # fmt: skip
    torch.backends.quantized.engine = engine
    float_model = dequantize(model) if is_quantized(model) else copy.deepcopy(model)
    float_model.eval()
    it = iter(batches)
    first = next(it, None)
    require(first is not None, "int8 conversion needs calibration batches")
    with _quiet():
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(engine), example_inputs=(first[0][:1],))
        prepared(first[0])
        for i, (x, *_) in enumerate(it, start=1):
            if i >= max_batches:
                break
            prepared(x)
        return convert_fx(prepared)
