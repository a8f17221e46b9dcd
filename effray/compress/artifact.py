"""Compressed artifacts that describe themselves: ``save_artifact`` / ``load_artifact``.

An artifact is a checkpoint directory holding ``model.pt``: one ``torch.save``d dict of
plain types and two uint8 tensors, so ``torch.load(weights_only=True)`` reads it and
nothing but data is unpickled. The file is the packed weights plus a few KB. It holds

* ``model_spec``: the base architecture (``build_model(**spec)``);
* ``layout`` (LZMA-compressed JSON, :func:`read_layout`): ``modules``, the type and
  constructor arguments of every conv, linear, BN and identity (shapes after pruning,
  bit widths, BN folded away), and ``tensors``, where each state-dict entry lies in the
  blob and how it is encoded (:mod:`effray.compress.pack`). Loading builds the base
  model and puts a module of the saved shape at each recorded name: no pickled module,
  no extra file;
* ``blob``: the encoded tensors; ``codec="lzma"`` compresses it, the entropy-coding
  stage of Deep Compression (Han et al. 2016);
* ``method`` (prune kind/rate/sparsity, bits per layer, KD), ``config``, ``teacher``
  (path and sha256), ``data`` (normalisation, for ``effray evaluate``), provenance;
* ``temperature``: the post-hoc temperature T fitted when the artifact was measured
  (:func:`record_temperature`); deployment's probabilities are ``softmax(logits / T)``.
  Always a float (1.0 until fitted), so recording it leaves the file's size as predicted.

The format is registered with the checkpoint loader, so ``load_checkpoint`` and
``effray evaluate`` open artifacts like any checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effray import __version__
from effray.atomic import write_file
from effray.compress.fakequant import LEARNED_STEP_BELOW, QUANT_TYPES, ActQuant, layer_args, make_layer
from effray.compress.pack import (
    decode_codes,
    decode_float,
    decode_raw,
    encode_codes,
    encode_float,
    encode_raw,
)
from effray.compress.quantize import fold_linked, freeze, has_linked_bn, set_module
from effray.errors import EffrayError
from effray.models import build_model
from effray.models.reference import is_reference, trusting
from effray.train.checkpoint import FORMATS, checkpoint_file, read_payload, save_payload

FORMAT = "effray.compressed"
_TYPES = {
    "Conv2d": nn.Conv2d,
    "Linear": nn.Linear,
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "Identity": nn.Identity,
}


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a file (a teacher's model.pt): ties an artifact to the weights it came from."""

    h = hashlib.sha256()
    with open(checkpoint_file(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def describe_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Type and constructor arguments of every module whose shape pruning, folding or
    quantization may have changed: what :func:`build_from` needs to rebuild it. Only
    layers of exactly these types: a library's subclass (timm's ``BatchNormAct2d``) keeps
    its own class and is rebuilt by :func:`describe_attrs` and :func:`fit_tensors`."""
    out: dict[str, dict[str, Any]] = {}
    inner = tuple(_quantized_prefixes(model))  # a quantized layer's own children rebuild with it
    names = {id(m): n for n, m in model.named_modules()}
    for name, m in model.named_modules():
        if not name or name.startswith(inner):
            continue
        if type(m) in (nn.Conv2d, nn.Linear) or isinstance(m, QUANT_TYPES):
            info = {"type": "Conv2d" if isinstance(m, nn.Conv2d) else "Linear", "args": layer_args(m)}
            if isinstance(m, QUANT_TYPES):
                info.update(
                    bits=m.bits, act_bits=m.act_bits, act_range=m.aq.mode if isinstance(m.aq, ActQuant) else "ema"
                )
                if m.linked_bn is not None:  # mid-QAT (a fine-tuning checkpoint): the BN whose fold it simulates
                    info["simulates_bn"] = names[id(m.linked_bn)]
            out[name] = info
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            out[name] = {
                "type": type(m).__name__,
                "args": {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine},
            }
        elif type(m) is nn.Identity:
            out[name] = {"type": "Identity", "args": {}}
    return out


def describe_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """For a model built by reference: every other module's integer attributes (an attention's
    ``num_heads`` after its heads were pruned, a norm's ``normalized_shape``), which a
    library's module reads in its forward. Built-in models have none that pruning changes."""
    if not is_reference(str(getattr(model, "spec", {}).get("name", ""))):
        return {}
    inner = tuple(_quantized_prefixes(model))
    described = describe_modules(model)
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if name in described or (name and name.startswith(inner)):
            continue
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(m).items() if _integral(k, v)}
        if attrs:
            out[name] = attrs
    return out


def _integral(key: str, value: Any) -> bool:
    if key.startswith("_") or key == "training":
        return False
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def set_attrs(model: nn.Module, attrs: dict[str, dict[str, Any]]) -> None:
    """Put :func:`describe_attrs`'s values back (a tuple where the module holds one)."""
    for name, values in (attrs or {}).items():
        m = model.get_submodule(name)
        for k, v in values.items():
            setattr(m, k, tuple(v) if isinstance(getattr(m, k, None), tuple) else v)


def fit_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter and buffer the shape ``state`` holds for it (empty until loaded):
    the rest of a pruned referenced model (a pruned norm's weights, a position embedding)
    takes its saved shape without a pickled module."""
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        m = model.get_submodule(owner) if owner else model
        current = m._parameters.get(leaf) if leaf in m._parameters else m._buffers.get(leaf)
        if current is None or tuple(current.shape) == tuple(t.shape):
            continue
        empty = torch.empty(t.shape, dtype=current.dtype, device=current.device)
        if leaf in m._parameters:
            m._parameters[leaf] = nn.Parameter(empty, requires_grad=current.requires_grad)
        else:
            m._buffers[leaf] = empty


def build_from(
    spec: dict[str, Any], modules: dict[str, dict[str, Any]], attrs: dict[str, dict[str, Any]] | None = None
) -> nn.Module:
    """The base architecture with every recorded module replaced by one of the saved type
    and shape, and the recorded attributes set (weights still to load)."""

    model = build_model(**spec)
    for name, info in modules.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise EffrayError(f"artifact names a layer {name!r} that {spec.get('name')} does not have") from None
        kind = info["type"]
        if kind in ("Conv2d", "Linear"):
            new = make_layer(
                "conv" if kind == "Conv2d" else "linear",
                info["args"],
                info.get("bits", 32),
                info.get("act_bits", 32),
                info.get("act_range", "ema"),
                learn=False,
            )
        else:
            new = _TYPES[kind](**info["args"])
        set_module(model, name, new)
    for name, info in modules.items():
        if info.get("simulates_bn"):
            model.get_submodule(name).link_bn(model.get_submodule(info["simulates_bn"]))
    set_attrs(model, attrs or {})
    return model


def _quantized_prefixes(model: nn.Module) -> dict[str, nn.Module]:
    return {f"{n}.": m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


@torch.no_grad()
def encode_state(model: nn.Module) -> tuple[torch.Tensor, list[list[Any]]]:
    """(blob, table): every state-dict tensor encoded (codes for quantized weights, fp16 for
    their step sizes and biases, sparse floats where pruned, raw otherwise)."""
    qlayers = _quantized_prefixes(model)
    parts, table, offset = [], [], 0
    for key, t in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        q = qlayers.get(prefix + ".")
        owner = qlayers.get(key.removesuffix("wq.scale")) if key.endswith(".wq.scale") else None
        bits = 0
        if q is not None and leaf == "weight":
            enc, data = encode_codes(q.wq.codes(q.weight), q.bits)
            bits = q.bits
        elif owner is not None:  # the step sizes the forward really uses: |s| rounded to fp16
            enc, data = encode_float(owner.wq.used_scale(), half=True)
        elif q is not None and leaf == "bias":
            enc, data = encode_float(t, half=True)
        elif t.dtype == torch.float32:
            enc, data = encode_float(t)
        else:
            enc, data = encode_raw(t)
        parts.append(data)
        table.append([key, enc, str(t.dtype).removeprefix("torch."), list(t.shape), offset, data.numel(), bits])
        offset += data.numel()
    blob = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return blob, table


def decode_state(blob: torch.Tensor, table: list[list[Any]]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    codes = []
    for key, enc, dtype, shape, offset, nbytes, bits in table:
        data = blob[offset : offset + nbytes]
        count = int(torch.Size(shape).numel())
        if enc in ("qdense", "qsparse"):
            codes.append((key, enc, shape, data, bits, count))
        elif enc == "raw":
            state[key] = decode_raw(data, getattr(torch, dtype)).view(shape)
        else:
            state[key] = decode_float(enc, data, count).view(shape)
    for key, enc, shape, data, bits, count in codes:  # weights = codes x their (decoded) step sizes
        scale = state[key.rpartition(".")[0] + ".wq.scale"]
        c = decode_codes(enc, data, bits, count).float().view(shape)
        state[key] = c * scale.view((-1,) + (1,) * (len(shape) - 1))
    return state


def artifact_payload(
    model: nn.Module,
    *,
    method: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    codec: str = "none",
    temperature: float = 1.0,
) -> dict[str, Any]:
    """The artifact as a dict (what :func:`save_artifact` writes). A model mid-QAT is written
    as it will deploy: a copy with the BNs whose fold it simulates folded."""
    spec = getattr(model, "spec", None)
    if not spec:
        raise EffrayError(
            "model has no .spec (build it with effray.models.build_model) so its artifact could not be rebuilt"
        )
    if has_linked_bn(model):
        model = fold_linked(copy.deepcopy(model))
    blob, table = encode_state(model)
    if codec == "lzma":
        blob = torch.frombuffer(
            bytearray(lzma.compress(blob.numpy().tobytes(), preset=9 | lzma.PRESET_EXTREME)), dtype=torch.uint8
        )
    elif codec != "none":
        raise EffrayError(f"unknown artifact codec {codec!r}; valid: none, lzma")
    plain = lambda x: json.loads(json.dumps(x, default=str))  # noqa: E731  (only plain types reach the pickle)
    return {
        "format": FORMAT,
        "model_spec": plain(spec),
        "layout": _to_bytes(_layout(model, table)),
        "codec": codec,
        "blob": blob,
        "method": plain(method or {}),
        "config": plain(config or {}),
        "teacher": plain(teacher or {}),
        "data": plain(data or {}),
        "provenance": {"effray_version": __version__, "torch": str(torch.__version__)},
        "temperature": float(temperature),
    }


def _layout(model: nn.Module, table: list[list[Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"modules": describe_modules(model)}
    attrs = describe_attrs(model)
    if attrs:  # referenced models only: a built-in model's layout stays as it was
        out["attrs"] = attrs
    if table is not None:
        out["tensors"] = table
    return out


def _to_bytes(obj: Any) -> torch.Tensor:
    """JSON -> LZMA -> uint8 tensor. The layout names every layer and tensor; pickled as
    lists it would outweigh a small model's 4-bit weights (~10 KB for ResNet-20)."""
    raw = lzma.compress(json.dumps(obj, separators=(",", ":"), default=str).encode(), preset=9)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def read_layout(payload: dict[str, Any]) -> dict[str, Any]:
    """The artifact's ``{"modules": ..., "tensors": ...}``: every layer's type and shape."""
    return json.loads(lzma.decompress(payload["layout"].numpy().tobytes()))


def model_from_payload(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model an artifact describes, weights loaded, quantizers frozen, eval mode."""
    try:
        layout = read_layout(payload)
        model = build_from(payload["model_spec"], layout["modules"], layout.get("attrs"))
        blob = payload["blob"]
        if payload.get("codec") == "lzma":
            blob = torch.frombuffer(bytearray(lzma.decompress(blob.numpy().tobytes())), dtype=torch.uint8)
        state = decode_state(blob, layout["tensors"])
        fit_tensors(model, state)
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, lzma.LZMAError, TypeError) as exc:
        raise EffrayError(
            f"compressed artifact is damaged or from another effray version: {str(exc).splitlines()[0][:200]}"
        ) from None
    model.spec = dict(payload["model_spec"])
    return freeze(model).eval()


FORMATS.register(FORMAT)(model_from_payload)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """A resumable training-state dict of a model mid-compression: its spec, module shapes and
    raw state dict (latent fp32 weights, step sizes, ranges), unpacked. What a fine-tuning
    checkpoint stores: the packed artifact keeps only the dequantized weights, and resuming
    QAT from those would lose the latent weights' sub-step detail."""
    layout = _layout(model)
    return {
        "model_spec": dict(model.spec),
        **layout,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def restore(snap: dict[str, Any], learn: bool = True) -> nn.Module:
    """Inverse of :func:`snapshot`: the same modules, the same state, trainable (unless not
    ``learn``); in train mode, as a fine-tuning loop expects."""
    model = build_from(snap["model_spec"], snap["modules"], snap.get("attrs"))
    fit_tensors(model, snap["state"])
    model.load_state_dict(snap["state"], strict=True)
    model.spec = dict(snap["model_spec"])
    if learn:
        for m in model.modules():
            if isinstance(m, QUANT_TYPES):
                m.wq.scale.requires_grad_(m.wq.bits < LEARNED_STEP_BELOW)
                if isinstance(m.aq, ActQuant) and m.aq.mode == "lsq":
                    m.aq.scale.requires_grad_(True)
    return model.train()


def save_artifact(directory: str | os.PathLike, model: nn.Module, **meta: Any) -> Path:
    """Write ``directory/model.pt`` atomically; returns its path. ``meta``: see
    :func:`artifact_payload`. Its size on disk is the size we report."""
    return save_payload(directory, artifact_payload(model, **meta))


def temperature_of(payload: dict[str, Any]) -> float:
    """The temperature a checkpoint or artifact records; 1.0 (logits as they are) for a file
    from before temperatures were recorded, or one that never had one fitted."""
    t = float(payload.get("temperature", 1.0))
    if not (t > 0 and t < float("inf")):
        raise EffrayError(f"checkpoint records temperature {t}; it must be a positive number (re-measure the artifact)")
    return t


def record_temperature(path: str | os.PathLike, temperature: float) -> Path:
    """Write ``temperature`` into the artifact at ``path`` (atomically, as it was saved):
    T is fitted when the saved file is measured, after it was written. A float replacing
    a float, so the file keeps its size to the byte."""
    payload = read_payload(path)
    if payload.get("format") != FORMAT:
        raise EffrayError(f"{path} is a {payload.get('format')!r} checkpoint, not a compressed artifact ({FORMAT})")
    t = float(temperature)
    if not (t > 0 and t < float("inf")):
        raise EffrayError(f"temperature must be a positive number, got {temperature}")
    payload = {**payload, "temperature": t}
    return write_file(checkpoint_file(path), lambda tmp: torch.save(payload, tmp))


def load_artifact(
    path: str | os.PathLike, trust_code: bool | Collection[str] = False
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, payload)`` from an artifact directory or its model.pt, with nothing else
    (``trust_code``: as :func:`~effray.train.checkpoint.load_checkpoint`'s)."""
    payload = read_payload(path)
    if payload.get("format") != FORMAT:
        raise EffrayError(f"{path} is a {payload.get('format')!r} checkpoint, not a compressed artifact ({FORMAT})")
    with trusting(trust_code):
        return model_from_payload(payload), payload
