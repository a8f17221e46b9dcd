"""The augmentation policy language: declared ops, and text parsed into checked chains.

An op is declared once, next to its implementation, by :func:`register`: its name, its
parameters (:class:`Param`: type, default, range) and what else it needs (the class
count for the label mixers, the seed and epoch for ops keyed by row). The parser below
reads ``"crop(4)|flip|cutout(8)"`` or a preset against that table, so every op's name,
signature and error messages come from one place.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from effray.errors import EffrayError
from effray.registry import Registry

Batch = dict[str, Any]
OpList = tuple[tuple[str, dict[str, Any]], ...]
PAIR = "pair"  # a (float, float) parameter, e.g. resized_crop's aspect-ratio range
PRESETS: dict[str, str] = {
    "none": "",
    "standard": "crop(4)|flip",
    "strong": "crop(4)|flip|randaugment(2,9)|cutout(8)",
}


@dataclass(frozen=True)
class Param:
    """One declared parameter: what the parser accepts and what the signature shows."""

    name: str
    kind: type | str  # int, float or PAIR
    default: Any
    lo: float
    hi: float

    def coerce(self, value: Any) -> Any:
        """The value in canonical form, or a one-line reason it is not acceptable."""
        if self.kind == PAIR:
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"{self.name} must be a pair (lo, hi), got {value!r}")
            a, b = (Param(self.name, float, 0.0, self.lo, self.hi).coerce(v) for v in value)
            if a > b:
                raise ValueError(f"{self.name} must be ordered (lo <= hi), got {value!r}")
            return (a, b)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be {self.kind.__name__}, got {value!r}")
        if self.kind is int and not isinstance(value, int):
            raise ValueError(f"{self.name} must be int, got {value!r}")
        value = self.kind(value)
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{self.name} must be in [{self.lo:g}, {self.hi:g}], got {value!r}")
        return value

    def __str__(self) -> str:
        kind = "(float, float)" if self.kind == PAIR else self.kind.__name__
        default = f"({self.default[0]:.4g}, {self.default[1]:.4g})" if self.kind == PAIR else repr(self.default)
        return f"{self.name}: {kind} = {default} in [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class OpSpec:
    """A registered op: its batch function and its declared parameters."""

    name: str
    fn: Callable[..., Batch]
    params: tuple[Param, ...]
    mixes_labels: bool = False  # also gets num_classes; writes batch["target"]
    keyed: bool = False  # also gets seed and epoch: draws per row from (seed, row index), not from the generator
    check: Callable[[dict[str, Any]], str | None] | None = None  # cross-parameter rule
    resizes: Callable[[dict[str, Any], int, int], tuple[int, int]] | None = None  # (params, h, w) -> output (h, w)
    random: bool = True  # False: draws nothing (a model's preprocessing may use it)

    def output_size(self, params: dict[str, Any], h: int, w: int) -> tuple[int, int]:
        """The (h, w) this op makes of ``h`` x ``w`` images."""
        return self.resizes(params, h, w) if self.resizes is not None else (h, w)

    def signature(self) -> str:
        return f"{self.name}({', '.join(str(p) for p in self.params)})"


OPS: Registry[OpSpec] = Registry("augment op")


def register(
    name: str,
    *params: Param,
    mixes_labels: bool = False,
    check: Callable[[dict[str, Any]], str | None] | None = None,
    keyed: bool = False,
    resizes: Callable[[dict[str, Any], int, int], tuple[int, int]] | None = None,
    random: bool = True,
) -> Callable:
    """Decorator: declare an op's parameters next to its implementation (``resizes``: the
    output size of an op that changes it; ``random=False``: an op that draws nothing)."""

    def deco(fn: Callable[..., Batch]) -> Callable[..., Batch]:
        spec = OpSpec(name, fn, params, mixes_labels, keyed, check, resizes, random)
        OPS.register(name)(spec)
        return fn

    return deco


def ordered(lo: str, hi: str) -> Callable[[dict[str, Any]], str | None]:
    """A cross-parameter check: ``lo <= hi``."""
    return lambda p: f"{lo} must be <= {hi}, got {p[lo]} > {p[hi]}" if p[lo] > p[hi] else None


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
