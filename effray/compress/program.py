"""The float program an int8 runtime or an export starts from: ``torch.export`` of a model's
float twin, with dynamic batch, quietly; and whether this CPU's int8 kernels have VNNI.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from effray.compress.quantize import dequantize, fold_bn, is_quantized
from effray.config import require
from effray.errors import EffrayError


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export / torchao / inductor warn and log on every call (deprecations, guard
    notes): none of it is the user's to act on."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch._export",
            "torch.export",
            "torch._dynamo",
            "torch._inductor",
            "torch.fx.experimental.symbolic_shapes",
            "torch.utils._pytree",
            "torch.utils.cpp_extension",
            "torch.onnx",
            "onnxscript",
            "torchao",
        )
    ]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def vnni() -> bool:
    """Whether this CPU has VNNI (u8 x s8 dot products into int32). Without it the int8
    kernels sum u8 x s8 pairs in saturating int16 (AVX2 ``vpmaddubsw``): full-range uint8
    activations then overflow, so they are quantized to 7 bits (``reduce_range``), as
    torch's FX x86 config did."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(caps.get(k, False) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def float_twin(model: nn.Module, keep_activations: bool = False) -> nn.Module:
    """The plain float model to export, ``model`` left untouched: fake-quant layers -> their
    dequantized weights (BN was folded before quantizing), or, unquantized, a copy with
    every conv/linear-fed BN folded in. Activation quantizers are dropped (what PTQ
    recalibrates), or kept as plain ops with ``keep_activations`` (the exact fp32 program)."""
    if is_quantized(model):
        return dequantize(model, keep_activations=keep_activations).eval()
    return fold_bn(copy.deepcopy(model)).eval()


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` taking float NCHW batches of any size. A model torch
    can't capture fails in one line naming the layer whose forward failed."""
    from torch.export import Dim

    require(len(example) >= 2, "the export example needs >= 2 images (batch 1 would be specialised, not dynamic)")
    try:
        with quiet(), torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; all mean "this model can't be captured"
        where = failing_layer(exc, model)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EffrayError(f"torch.export can't capture {where}: {first}") from None


def failing_layer(exc: BaseException, model: nn.Module) -> str:
    """The innermost module of ``model`` whose forward is on ``exc``'s traceback, by name."""
    names = {id(m): n for n, m in model.named_modules()}
    found, tb = None, exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = owner
        tb = tb.tb_next
    if found is None:
        return f"the model ({type(model).__name__})"
    return f"layer {names[id(found)] or '<root>'!r} ({type(found).__name__})"
