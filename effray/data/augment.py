"""Augmentation policies: parse ``"crop(4)|flip|cutout(8)"`` into a chain of batch ops.

The ops live in :mod:`effray.data.augment_ops` (plus RandAugment/TrivialAugment here);
this module turns text into a checked :class:`Policy`, derives each batch's generator
from (seed, epoch, key), and normalises. The torch backend reuses :func:`parse_ops`, so
both backends accept exactly the same text.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from effray.data.augment_ops import (
    FUSED_PAIRS,
    OPS,
    Batch,
    OpSpec,
    Param,
    _affine_rows,
    _blend,
    _gray,
    _rotation,
    _to_u8,
    _warp,
    register,
)
from effray.errors import EffrayError

PRESETS: dict[str, str] = {
    "none": "",
    "standard": "crop(4)|flip",
    "strong": "crop(4)|flip|randaugment(2,9)|cutout(8)",
}
OpList = tuple[tuple[str, dict[str, Any]], ...]

# ------------------------------------------------------------------ RandAugment / TrivialAugment

# sub-op -> (RandAugment max, TrivialAugmentWide max, signed), as torchvision; magnitude bin
# b of 31 gives value = b/30 * max. Translations are fractions of the image side (TA's 32 px
# on CIFAR = 1.0); posterize's value is bits dropped, solarize's is 255 - threshold.
AUTO_MAGNITUDES: dict[str, tuple[float, float, bool]] = {
    "identity": (0.0, 0.0, False),
    "autocontrast": (0.0, 0.0, False),
    "equalize": (0.0, 0.0, False),
    "rotate": (30.0, 135.0, True),
    "solarize": (255.0, 255.0, False),
    "color": (0.9, 0.99, True),
    "posterize": (4.0, 6.0, False),
    "contrast": (0.9, 0.99, True),
    "brightness": (0.9, 0.99, True),
    "sharpness": (0.9, 0.99, True),
    "shear_x": (0.3, 0.99, True),
    "shear_y": (0.3, 0.99, True),
    "translate_x": (150 / 331, 1.0, True),
    "translate_y": (150 / 331, 1.0, True),
}
MAGNITUDE_BINS = 31


def _autocontrast(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=(1, 2), keepdims=True).astype(np.float32)
    hi = x.max(axis=(1, 2), keepdims=True).astype(np.float32)
    flat = hi <= lo
    return _to_u8((x - np.where(flat, 0, lo)) * np.where(flat, 1, 255 / np.where(flat, 1, hi - lo)))


def _equalize(x: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation with torchvision's LUT, all channels at once."""
    n, h, w, c = x.shape
    flat = x.transpose(0, 3, 1, 2).reshape(n * c, h * w).astype(np.int64)
    hist = np.bincount((flat + 256 * np.arange(n * c)[:, None]).ravel(), minlength=n * c * 256)
    hist = hist.reshape(n * c, 256)
    last = hist[np.arange(n * c), 255 - np.argmax(hist[:, ::-1] > 0, axis=1)]
    step = ((h * w - last) // 255)[:, None]
    lut = (np.cumsum(hist, 1) + step // 2) // np.maximum(step, 1)
    lut = np.clip(np.concatenate([np.zeros((n * c, 1), np.int64), lut[:, :-1]], 1), 0, 255)
    lut = np.where(step == 0, np.arange(256), lut)
    return np.take_along_axis(lut, flat, 1).reshape(n, c, h, w).transpose(0, 2, 3, 1).astype(np.uint8)


def _sharpen_base(x: np.ndarray) -> np.ndarray:
    """PIL's SMOOTH kernel (1s around a 5, /13) on the interior; borders stay put."""
    f = x.astype(np.float32)
    h, w = f.shape[1:3]
    s = sum(f[:, 1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out = f.copy()
    out[:, 1:-1, 1:-1] = np.rint((s + 4 * f[:, 1:-1, 1:-1]) / 13)
    return out


def _geo(x: np.ndarray, v: np.ndarray, kind: str) -> np.ndarray:
    n, h, w, _ = x.shape
    one, z = np.ones(n), np.zeros(n)
    if kind == "rotate":
        return _warp(x, _rotation(v, h, w))
    mats = {
        # shears pivot on (-0.5, -0.5), the image's corner, as torchvision's do
        "shear_x": (one, v, v / 2, z, one, z),
        "shear_y": (one, z, z, v, one, v / 2),
        "translate_x": (one, z, -np.rint(v * w), z, one, z),
        "translate_y": (one, z, z, z, one, -np.rint(v * h)),
    }[kind]
    return _warp(x, _affine_rows(*mats))


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


SUB_OPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "identity": lambda x, v: x,
    "autocontrast": lambda x, v: _autocontrast(x),
    "equalize": lambda x, v: _equalize(x),
    "solarize": lambda x, v: np.where(x >= (255 - v).reshape(-1, 1, 1, 1), 255 - x, x),
    "posterize": lambda x, v: x & (256 - 2 ** np.rint(v)).astype(np.uint8).reshape(-1, 1, 1, 1),
    "color": lambda x, v: _to_u8(_blend(_f32(x), _gray(_f32(x)), 1 + v)),
    "contrast": lambda x, v: _to_u8(_blend(_f32(x), _gray(_f32(x)).mean(axis=(1, 2, 3), keepdims=True), 1 + v)),
    "brightness": lambda x, v: _to_u8(_blend(_f32(x), 0.0, 1 + v)),
    "sharpness": lambda x, v: _to_u8(_blend(_f32(x), _sharpen_base(x), 1 + v)),
    "rotate": lambda x, v: _geo(x, v, "rotate"),
    "shear_x": lambda x, v: _geo(x, v, "shear_x"),
    "shear_y": lambda x, v: _geo(x, v, "shear_y"),
    "translate_x": lambda x, v: _geo(x, v, "translate_x"),
    "translate_y": lambda x, v: _geo(x, v, "translate_y"),
}


def apply_sub_ops(images: np.ndarray, choice: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Apply sub-op ``choice[i]`` (index into AUTO_MAGNITUDES) with value ``values[i]`` to
    image i, one vectorised call per sub-op group."""
    out = images.copy()
    for k, name in enumerate(AUTO_MAGNITUDES):
        sel = np.flatnonzero(choice == k)
        if sel.size:
            out[sel] = SUB_OPS[name](images[sel], values[sel])
    return out


def auto_values(choice: np.ndarray, bins: np.ndarray, sign: np.ndarray, wide: bool) -> np.ndarray:
    """Signed sub-op values from magnitude bins (0..30), per image."""
    table = np.array([(m[int(wide)], m[2]) for m in AUTO_MAGNITUDES.values()], np.float64)
    mx, signed = table[choice, 0], table[choice, 1] > 0
    return bins / (MAGNITUDE_BINS - 1) * mx * np.where(signed, sign, 1.0)


@register("randaugment", Param("n", int, 2, 0, 10), Param("m", int, 9, 0, MAGNITUDE_BINS - 1))
def randaugment(batch: Batch, rng: np.random.Generator, n: int = 2, m: int = 9) -> Batch:
    """RandAugment: n rounds, each applying a uniformly chosen sub-op at magnitude m/30."""
    img = batch["image"]
    for _ in range(n):
        choice = rng.integers(0, len(AUTO_MAGNITUDES), len(img))
        sign = np.where(rng.random(len(img)) < 0.5, -1.0, 1.0)
        img = apply_sub_ops(img, choice, auto_values(choice, np.full(len(img), m), sign, wide=False))
    return {**batch, "image": img}


@register("trivialaugment")
def trivialaugment(batch: Batch, rng: np.random.Generator) -> Batch:
    """TrivialAugmentWide: one sub-op per image at a uniformly random magnitude bin."""
    img = batch["image"]
    choice = rng.integers(0, len(AUTO_MAGNITUDES), len(img))
    bins = rng.integers(0, MAGNITUDE_BINS, len(img))
    sign = np.where(rng.random(len(img)) < 0.5, -1.0, 1.0)
    return {
        **batch,
        "image": apply_sub_ops(img, choice, auto_values(choice, bins, sign, wide=True)),
    }


# ------------------------------------------------------------------ parsing


def _bad(spec: OpSpec, why: str) -> EffrayError:
    return EffrayError(f"augment op {spec.name}: {why}; signature: {spec.signature()}")


def _parse_one(text: str) -> tuple[str, dict[str, Any]]:
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        node = None
    call = node if isinstance(node, ast.Call) else None
    name_node = call.func if call else node
    if not isinstance(name_node, ast.Name) or (call and any(isinstance(a, ast.Starred) for a in call.args)):
        raise EffrayError(f"cannot parse augment op {text!r}; write name or name(arg, key=value), e.g. cutout(8)")
    try:
        spec = OPS.get(name_node.id)
    except EffrayError as e:
        raise EffrayError(f"{e}; or a preset: {', '.join(PRESETS)}") from None
    if call and any(k.arg is None for k in call.keywords):
        raise _bad(spec, "**kwargs are not accepted")
    try:
        args = [ast.literal_eval(a) for a in call.args] if call else []
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords} if call else {}
    except ValueError:
        raise _bad(spec, f"parameters must be literal numbers or pairs, got {text!r}") from None
    if len(args) > len(spec.params):
        raise _bad(spec, f"takes at most {len(spec.params)} parameters, got {len(args)}")
    given = dict(zip([p.name for p in spec.params], args, strict=False))
    for k, v in kwargs.items():
        if k not in {p.name for p in spec.params}:
            raise _bad(spec, f"unknown parameter {k!r}")
        if k in given:
            raise _bad(spec, f"parameter {k!r} given twice")
        given[k] = v
    params = {}
    for p in spec.params:
        try:
            params[p.name] = p.coerce(given.get(p.name, p.default))
        except ValueError as e:
            raise _bad(spec, str(e)) from None
    if spec.check and (why := spec.check(params)):
        raise _bad(spec, why)
    return spec.name, params


def parse_ops(text: str) -> OpList:
    """Text -> checked ``((name, params), ...)``: a preset or ``|``-chain (presets may appear
    in a chain). Every parameter is filled in, so the result is the canonical form."""
    if not isinstance(text, str) or not text.strip():
        raise EffrayError(f"empty augmentation policy {text!r}; use 'none' or a chain like 'crop(4)|flip'")
    ops: list[tuple[str, dict[str, Any]]] = []
    for part in (s.strip() for s in text.split("|")):
        if not part:
            raise EffrayError(f"empty op in augmentation policy {text!r}; ops are separated by single '|'")
        if part in PRESETS:
            ops.extend(parse_ops(PRESETS[part]) if PRESETS[part] else ())
        else:
            ops.append(_parse_one(part))
    return tuple(ops)


def format_ops(ops: OpList) -> str:
    """The canonical text of a chain (every parameter by keyword); parses back to itself."""

    def one(name: str, params: dict[str, Any]) -> str:
        return f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})" if params else name

    return "|".join(one(*op) for op in ops) or "none"


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EffrayError(f"num_classes must be a positive int, got {num_classes!r}")


@dataclass(frozen=True)
class PolicyBase:
    """What both backends' policies share: the parsed chain and what it says about itself."""

    chain: OpList
    num_classes: int

    @property
    def ops(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, dict(params)) for name, params in self.chain]

    @property
    def mixes_labels(self) -> bool:
        return any(OPS.get(name).mixes_labels for name, _ in self.chain)

    @property
    def is_identity(self) -> bool:
        return not self.chain

    def __str__(self) -> str:
        return format_ops(self.chain)

    def extra(self, name: str, seed: int = 0, epoch: int = 0) -> dict[str, Any]:
        """What an op gets besides its parameters: num_classes for the label mixers, the
        seed and epoch for ops keyed by row (``altflip``)."""
        spec = OPS.get(name)
        return {
            **({"num_classes": self.num_classes} if spec.mixes_labels else {}),
            **({"seed": int(seed), "epoch": int(epoch)} if spec.keyed else {}),
        }


class Policy(PolicyBase):
    """A parsed chain of numpy ops: ``policy(batch, rng) -> batch`` applies them in order.

    Adjacent geometric pairs with a fused version (:data:`FUSED_PAIRS`: crop then flip,
    flip then rotate) run as one pixel gather, drawing the same numbers in the same order,
    so the output is the pair's, pixel for pixel, at one pass's cost."""

    def __call__(self, batch: Batch, rng: np.random.Generator, *, seed: int = 0, epoch: int = 0) -> Batch:
        out, chain, i = dict(batch), self.chain, 0
        while i < len(chain):
            (name, params), nxt = chain[i], chain[i + 1] if i + 1 < len(chain) else None
            fused = FUSED_PAIRS.get((name, nxt[0])) if nxt else None
            result = fused(out, rng, dict(params), dict(nxt[1])) if fused else None
            if result is not None:
                out, i = result, i + 2
                continue
            out, i = OPS.get(name).fn(out, rng, **params, **self.extra(name, seed, epoch)), i + 1
        return out


@functools.lru_cache(maxsize=64)
def parse_policy(text: str, num_classes: int) -> Policy:
    """Parse a policy once (cached: the pipeline calls this per batch). num_classes is
    what mixup/cutmix need to build one-hot targets."""
    _check_classes(num_classes)
    return Policy(parse_ops(text), num_classes)


def batch_rng(seed: int, epoch: int, key: int) -> np.random.Generator:
    """The generator for one batch: same (seed, epoch, key) -> same augmentations, a new
    epoch -> fresh ones, wherever the batch happens to be processed."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(key)]))


def _stats(x: Sequence[float] | float, c: int, what: str) -> np.ndarray:
    a = np.asarray(x, np.float32).reshape(-1)
    if a.size not in (1, c):
        raise EffrayError(f"normalize: {what} has {a.size} values for {c}-channel images")
    if what == "std" and np.any(a <= 0):
        raise EffrayError(f"normalize: std must be > 0, got {a.tolist()}")
    return np.broadcast_to(a, (c,))


def normalize(
    images: np.ndarray,
    mean: Sequence[float] | float,
    std: Sequence[float] | float,
    channels_last: bool = False,
) -> np.ndarray:
    """uint8 NHWC -> float32 (x/255 - mean)/std, NCHW unless channels_last; mean/std per
    channel in 0..1 units (as meta.json stores them)."""
    c = images.shape[-1]
    m, s = _stats(mean, c, "mean"), _stats(std, c, "std")
    out = (images.astype(np.float32) * np.float32(1 / 255) - m) / s
    return out if channels_last else np.ascontiguousarray(out.transpose(0, 3, 1, 2))
