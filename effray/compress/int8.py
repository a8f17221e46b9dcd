"""Real int8 execution on CPU: torchao's PT2E post-training quantization, lowered for x86.

The flow: ``torch.export`` the float model (dynamic batch, :mod:`effray.compress.program`)
-> ``prepare_pt2e`` with ``X86InductorQuantizer`` (uint8 per-tensor affine activations,
int8 per-channel symmetric weights) -> calibrate -> ``convert_pt2e`` (a q/dq graph: int8
weights, quantize/dequantize ops around every conv and linear) -> :func:`lower_x86`, which
runs inductor's freezing passes on that graph without generating code: each dq ->
conv/linear -> q pattern becomes one oneDNN int8 kernel (``onednn.qconv_pointwise``,
``qconv2d_pointwise.binary`` for a residual add, ``qlinear_pointwise``; ReLU fused, weights
prepacked). The result is a plain ``GraphModule`` that calls those kernels eagerly, at any
batch size: lowering happens once, where ``torch.compile`` with ``freezing=True`` would
recompile for every new batch shape (an ``effray compress`` timing three shapes would pay
that per trial). The eager graph pays per-op dispatch and runs max-pools on float copies.

A student whose activations were quantized in training (QAT/PTQ) gets an int8 program that
rounds where it rounded, on its grids, and nowhere else: each int8 layer's input takes the
student's own activation scale and zero point (:func:`_pin_activation_grids`), the pools
stay float, and so it computes the student's logits. On a CPU without VNNI (AVX2 only) the
int8 kernels sum u8 x s8 products in saturating int16: a student's layers whose weight
codes fit 7 bits (|w| <= 63, so 255 * 63 * 2 < 2^15) still run int8 with 8-bit
activations, its 8-bit-weight layers (the first and last of every recipe) stay float with
their activation quantizer (:func:`int8_layers`); a float model's activations are
calibrated at 7 bits there (``reduce_range``).

The float twin of a fake-quantized student (:func:`~effray.compress.quantize.dequantize`)
is what gets exported, and the student's own weight grid is kept: each quantized layer's
int8 weight scale is the student's per-channel step ``s`` (not ``max|w| / 127.5``, what the
observer would pick), so the int8 codes are the student's k-bit codes exactly. At 8 bits
that is the QAT grid, codes in [-127, 127]; below 8 bits the codes are a subset of int8
([-(2^(k-1)-1), 2^(k-1)-1]): x86 has no sub-byte conv kernels, so the k-bit weights run as
int8 with nothing re-rounded. Activations are recalibrated (HistogramObserver).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from effray.compress.fakequant import MIN_SCALE, QUANT_TYPES, ActQuant
from effray.compress.program import export_program, float_twin, quiet, vnni
from effray.compress.quantize import FixedActQuant, dequantize, set_module
from effray.config import require
from effray.errors import EffrayError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
ENGINES = ("x86",)
QUANTIZED_OPS = ("onednn.qconv", "onednn.qlinear")  # what real int8 execution calls (see :func:`int8_ops`)
SAFE_CODE = 63  # |weight code| <= 63: two u8 x s8 products always fit int16 (2 x 255 x 64 = 32,640)


def weight_steps(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": per-channel step}`` of every fake-quant layer of ``model``: the
    int8 scales that keep its k-bit weights exact (the float twin's parameter names)."""
    return {
        f"{n}.weight": m.wq.used_scale().detach().float().cpu()
        for n, m in model.named_modules()
        if isinstance(m, QUANT_TYPES)
    }


def activation_grids(model: nn.Module) -> dict[str, tuple[float, int, int]]:
    """``{"<layer>.weight": (scale, zero point, bits)}`` of every fake-quant layer of ``model``
    that quantizes its input: the grid the student rounds that input to."""
    return {
        f"{n}.weight": (float(m.aq.scale.detach().abs().clamp_min(1e-8)), int(m.aq.zero), int(m.aq.bits))
        for n, m in model.named_modules()
        if isinstance(m, QUANT_TYPES) and isinstance(m.aq, ActQuant) and m.aq.is_ready
    }


def _pin_weight_grids(prepared: torch.fx.GraphModule, steps: dict[str, torch.Tensor]) -> int:
    """Make each observed weight's int8 scale the student's step where its codes fit the
    observer's range: the symmetric observer picks ``max(|min|, max) / ((qmax - qmin) / 2)``,
    so a range of +-(qmax - qmin) / 2 * s gives exactly ``s`` (an fp16 value: the product
    and the division are exact in fp32). Returns the layers pinned."""
    pinned = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or getattr(node.args[0], "op", None) != "get_attr":
            continue
        step = steps.get(node.args[0].target)
        obs = getattr(prepared, str(node.target))
        if step is None or not hasattr(obs, "min_val") or obs.min_val.shape != step.shape:
            continue
        weight = operator.attrgetter(node.args[0].target)(prepared)
        codes = weight.detach().flatten(1) / step.view(-1, 1)
        if codes.abs().max() > obs.quant_max or not torch.equal(codes, codes.round()):
            continue  # codes the int8 range can't hold: the observer's own scale
        half_range = (obs.quant_max - obs.quant_min) / 2
        obs.min_val.copy_(-half_range * step)
        obs.max_val.copy_(half_range * step)
        obs.eps.fill_(min(float(obs.eps), MIN_SCALE))  # the observer's 2^-12 floor would re-round tiny steps
        pinned += 1
    return pinned


def activation_quantized(model: nn.Module) -> bool:
    """Whether every fake-quant layer of ``model`` quantizes its input (a QAT/PTQ student)."""
    layers = [m for m in model.modules() if isinstance(m, QUANT_TYPES)]
    return bool(layers) and all(isinstance(m.aq, ActQuant) and m.aq.is_ready for m in layers)


def int8_layers(model: nn.Module, reduce_range: bool) -> list[str]:
    """The student's layers that run int8 kernels. With ``reduce_range`` (no VNNI: the
    kernels sum uint8 x int8 pairs in int16) only those whose weight codes fit 7 bits
    (255 * 63 * 2 < 2^15), with 8-bit activations; the others (8-bit weights: every
    recipe's first and last layer) stay float and exact. With VNNI, every layer."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANT_TYPES) and (not reduce_range or m.bits < 8)]


def student_twin(model: nn.Module, int8_names: list[str]) -> nn.Module:
    """The float twin of a student, its activation quantizers kept (as
    :class:`~effray.compress.quantize.FixedActQuant`) on the layers that stay float, so
    those compute exactly what the student does; the int8 layers quantize their own input
    on the student's grid (:func:`_pin_activation_grids`)."""
    twin = dequantize(model).eval()
    plain = dict(twin.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QUANT_TYPES) and name not in int8_names:
            set_module(twin, name, nn.Sequential(FixedActQuant(m.aq), plain[name]))
    return twin


def _pin_activation_grids(prepared: torch.fx.GraphModule, model: nn.Module) -> int:
    """Give each int8 conv/linear input the student's own activation scale and zero point
    (a fixed-range observer in place of the calibrated one): uint8 codes equal to the
    student's k-bit activation codes, which is how its int8 program agrees with it."""
    from torchao.quantization.pt2e import MinMaxObserver

    quantizers = {n: m.aq for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}
    pinned = 0
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (
            torch.ops.aten.conv2d.default,
            torch.ops.aten.linear.default,
        ):
            continue
        source, stack = node.args[0], node.meta.get("nn_module_stack") or {}
        aq = quantizers.get(list(stack.values())[-1][0] if stack else "")
        if aq is None or getattr(source, "op", None) != "call_module":
            continue
        old = getattr(prepared, str(source.target))
        s, z = float(aq.scale.detach().abs().clamp_min(1e-8)), float(aq.zero)
        fixed = MinMaxObserver(
            dtype=old.dtype,
            qscheme=torch.per_tensor_affine,
            quant_min=old.quant_min,
            quant_max=old.quant_max,
            eps=1e-12,
        )
        fixed.min_val, fixed.max_val = torch.tensor(-z * s), torch.tensor((old.quant_max - z) * s)
        setattr(prepared, str(source.target), fixed)
        pinned += 1
    return pinned


@torch.no_grad()
def quantize_int8(
    model: nn.Module, batches: Batches, *, max_batches: int = 8, reduce_range: bool | None = None
) -> torch.fx.GraphModule:
    """The converted PT2E program of ``model``'s float twin: int8 weights (on the student's
    own grid when ``model`` is fake-quantized) and q/dq ops around every int8 conv/linear;
    uint8 activations on a student's own grids, else calibrated on up to ``max_batches``
    of ``batches``; any batch size. Runs anywhere as float arithmetic on int8 values (the
    portable form :func:`lower_x86` and ``effray export`` start from). ``reduce_range``
    (default: unless this CPU has VNNI, see :func:`vnni`): a student's 8-bit-weight layers
    stay float, a float model's activations get 7 bits. ``meta["float_layers"]``: the
    student's layers left float."""
    with quiet():  # torchao's import logs a deprecation through torch's logger
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

    require(max_batches >= 1, f"max_batches must be >= 1, got {max_batches}")
    it = iter(batches)
    first = next(it, None)
    require(first is not None, "int8 conversion needs calibration batches")
    reduce_range = not vnni() if reduce_range is None else reduce_range
    student = activation_quantized(model)
    on_int8 = int8_layers(model, reduce_range) if student else []
    twin = student_twin(model, on_int8) if student else float_twin(model)
    program = export_program(twin, first[0] if len(first[0]) >= 2 else first[0].repeat(2, 1, 1, 1))
    # a student whose activations were quantized in training: the int8 program rounds where it
    # rounded, on its grid, and nowhere else. Full-range activations on its int8 layers
    # (their weights can't overflow even without VNNI), the pools left in float (they would
    # add rounding points the student never had); a plain float model: calibrated ranges
    config = get_default_x86_inductor_quantization_config(reduce_range=reduce_range and not student)
    quantizer = X86InductorQuantizer().set_global(config)
    if student:
        for op in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, torch.flatten):
            quantizer.set_module_type_qconfig(op, None)
        for name, m in model.named_modules():
            if isinstance(m, QUANT_TYPES) and name not in on_int8:
                quantizer.set_module_name_qconfig(name, None)
    with quiet():
        try:
            prepared = prepare_pt2e(program.module(), quantizer)
        except (ValueError, RuntimeError, AssertionError, NotImplementedError) as exc:  # torchao's pattern matcher
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise EffrayError(
                f"int8 (PT2E, x86): torchao can't quantize this model's graph ({type(exc).__name__}: {first_line}); "
                "its fp32 files and the ONNX int8 file are unaffected: leave out the torch int8 runtime for it"
            ) from None
        prepared(first[0])
        for i, (x, *_) in enumerate(it, start=1):
            if i >= max_batches:
                break
            prepared(x)
        if student:
            _pin_activation_grids(prepared, model)
        pinned = _pin_weight_grids(prepared, weight_steps(model))
        converted = convert_pt2e(prepared)
    converted.meta["float_layers"] = (
        [n for n, m in model.named_modules() if isinstance(m, QUANT_TYPES) and n not in on_int8] if student else []
    )
    converted.meta["student_grid_layers"] = pinned  # how many layers kept the student's k-bit grid
    return converted


@torch.no_grad()
def lower_x86(converted: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """``converted`` (a PT2E q/dq program) with its patterns replaced by oneDNN int8
    kernels, weights prepacked; still any batch size. Inductor's pass, no code generation."""
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes
    from torch.export import Dim

    require(len(example) >= 2, "the lowering example needs >= 2 images")
    require(
        torch.backends.mkldnn.is_available(),
        "int8 x86 kernels need torch built with oneDNN (mkldnn); this build has none",
    )
    # torchao's lower_pt2e_quantized_to_x86, step for step, but on a dynamic-batch export:
    # it exports with a static batch, and its module then refuses every other batch size
    table = {k: v for k, v in torch.export.default_decompositions().items() if torch._export.utils._is_cia_op(k)}
    with quiet():
        lowered = (
            torch.export.export(converted, (example,), dynamic_shapes=({0: Dim("batch")},))
            .run_decompositions(table)
            .module()
        )
        _replace(lowered, torch.ops.aten.t.default, lambda x: (torch.ops.aten.permute.default, (x, [1, 0])))
        freezing_passes(lowered, (example,))
        constant_fold(lowered)
        # oneDNN's int8 convs return channels-last tensors, which a flatten's view can't take
        # (inductor would pick layouts itself; run eagerly, the graph must copy where needed)
        _replace(lowered, torch.ops.aten.view.default, lambda x, shape: (torch.ops.aten.reshape.default, (x, shape)))
        _reshape_in_uint8(lowered)
    # a plain GraphModule: the exported program's module refuses .eval()/.train(), which
    # every caller timing or scoring a model makes
    return torch.fx.GraphModule(lowered, lowered.graph, class_name="Int8Module")


def _reshape_in_uint8(gm: torch.fx.GraphModule) -> None:
    """``dequantize -> reshape -> quantize`` with one scale and zero point is the reshape of
    the uint8 tensor itself: run it so, as inductor's generated code would, not on a float
    copy; likewise drop a bare ``quantize(dequantize(x))``. Exact. (Max-pools stay on the
    float copy: torch's integer max-pool refuses maps over 255 elements.)"""
    q, dq = (
        torch.ops.quantized_decomposed.quantize_per_tensor.default,
        torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    )
    for node in list(gm.graph.nodes):
        if node.target != q:
            continue
        between = node.args[0] if getattr(node.args[0], "target", None) == torch.ops.aten.reshape.default else None
        src = between.args[0] if between is not None else node.args[0]
        if getattr(src, "target", None) != dq or tuple(src.args[1:6]) != tuple(node.args[1:6]) or src.kwargs:
            continue
        if between is None:
            node.replace_all_uses_with(src.args[0])
        elif len(src.users) == 1 and len(between.users) == 1:
            between.replace_input_with(src, src.args[0])
            node.replace_all_uses_with(between)
        else:
            continue
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _replace(gm: torch.fx.GraphModule, target: Any, make: Any) -> None:
    """Every call of ``target`` replaced by the ``(op, args)`` that ``make(*args)`` names."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == target:
            op, args = make(*node.args)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(op, args=args)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def int8_ops(module: nn.Module) -> list[str]:
    """The oneDNN int8 kernels ``module``'s graph calls (empty: it runs no int8 kernel)."""
    graph = getattr(module, "graph", None)
    calls = [str(n.target) for n in graph.nodes if n.op == "call_function"] if graph is not None else []
    return sorted({c for c in calls if c.startswith(QUANTIZED_OPS)})


@torch.no_grad()
def to_int8(model: nn.Module, batches: Batches, *, engine: str = "x86", max_batches: int = 8) -> nn.Module:
    """An int8 ``GraphModule`` of ``model`` (left untouched) running oneDNN int8 kernels on
    x86, activations calibrated on up to ``max_batches`` of ``batches``; any batch size."""
    require(
        engine in ENGINES, f"int8 engine {engine!r} is not supported; supported: {', '.join(ENGINES)} (PT2E + oneDNN)"
    )
    batches = list(_take(batches, max_batches))
    converted = quantize_int8(model, batches, max_batches=max_batches)
    x = batches[0][0]
    return lower_x86(converted, x if len(x) >= 2 else x.repeat(2, 1, 1, 1))


def _take(batches: Batches, n: int) -> Iterator[Any]:
    for i, b in enumerate(batches):
        if i >= n:
            return
        yield b
