"""Config dataclasses and the one mechanism that turns them into CLI flags, dicts and back.

Every stage's config is a frozen dataclass with a ``validate()`` method. The same
definition produces the argparse flags (``add_arguments``), the plain nested dict that
goes to wandb, Ray Tune's ``param_space`` and checkpoints (``to_dict``), and the
config rebuilt on a worker (``from_dict``, strict: an unknown key is an error).
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import types
import typing
from typing import Any, TypeVar, Union

from effray.errors import EffrayError

C = TypeVar("C")


AUTO = 0.0  # a numeric field's "auto" (fit the cluster), as its config stores it


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None, auto: bool = False, **kw: Any) -> Any:
    """A dataclass field with the help text (and allowed values) its CLI flag shows.
    ``auto``: the flag also takes ``auto``, stored as :data:`AUTO` and resolved by the stage."""
    meta: dict[str, Any] = {"help": help}
    if auto:
        meta["auto"] = True
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--flag`` per field of ``cls``. Nested configs' fields are flattened into
    the same flag namespace (``TrainConfig.data.augment`` is ``--augment``), so a name
    used twice is an argparse conflict caught when the parser is built."""
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _strip_optional(hints[f.name])
        dest = f"{prefix}{f.name}"
        if _is_config(tp):
            add_arguments(parser, tp, prefix=f"{dest}__")
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {
            "dest": dest,
            "default": default,
            "help": f.metadata.get("help", ""),
            "metavar": f.name.upper(),
        }
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            del kwargs["metavar"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        elif typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs["type"] = item
            kwargs["nargs"] = "*"
        elif f.metadata.get("auto"):
            kwargs["type"] = _auto_parser(tp)
            kwargs["default"] = "auto" if default == AUTO else default
        else:
            kwargs["type"] = _optional_parser(tp) if optional else tp
        parser.add_argument(flag, **kwargs)


def _auto_parser(tp: Any) -> Any:
    def parse(text: str) -> Any:
        return AUTO if str(text).lower() == "auto" else tp(text)

    parse.__name__ = f"auto or {getattr(tp, '__name__', 'value')}"
    return parse


def _optional_parser(tp: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def from_namespace(cls: type[C], ns: argparse.Namespace, prefix: str = "") -> C:
    """Build ``cls`` from parsed args written by :func:`add_arguments`, then validate it."""
    hints = _resolved_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        dest = f"{prefix}{f.name}"
        if _is_config(tp):
            values[f.name] = from_namespace(tp, ns, prefix=f"{dest}__")
        elif hasattr(ns, dest):
            value = getattr(ns, dest)
            values[f.name] = tuple(value) if typing.get_origin(tp) is tuple else value
    return validated(cls(**values))


def validated(cfg: C) -> C:
    """Run ``validate()`` on a config and on every nested config in it."""
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validated(value)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (JSON/YAML/wandb/Tune friendly)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type[C], data: dict[str, Any], strict: bool = True) -> C:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error when strict."""
    if not isinstance(data, dict):
        raise EffrayError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    hints = _resolved_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = set(fields)
    unknown = sorted(set(data) - names)
    if unknown and strict:
        raise EffrayError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    values: dict[str, Any] = {}
    for name in names & set(data):
        tp, _ = _strip_optional(hints[name])
        value = data[name]
        if _is_config(tp) and isinstance(value, dict):
            value = from_dict(tp, value, strict=strict)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        elif tp in (int, float) and value is not None:
            value = _number(name, tp, value, bool(fields[name].metadata.get("auto")))
        values[name] = value
    return validated(cls(**values))


def _number(name: str, tp: type, value: Any, auto: bool) -> Any:
    """A numeric field's value from a file (a preset, a space, a saved config) read as its
    flag reads it: ``auto`` where the flag takes it, a number written as text, an int
    where a float goes; anything else one line naming the key."""
    if isinstance(value, str):
        try:
            return _auto_parser(tp)(value) if auto else tp(value)
        except ValueError:
            pass
    elif not isinstance(value, bool) and isinstance(value, numbers.Real) and (tp is float or float(value).is_integer()):
        return tp(value)
    kind = f"{'an integer' if tp is int else 'a number'}{' or auto' if auto else ''}"
    raise EffrayError(f"{name} must be {kind}, got {value!r}")


def flag_paths(cls: type, prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Each flag's name (as :func:`add_arguments` flattens nested configs: ``augment`` for
    ``TrainConfig.data.augment``) -> its path in the nested config."""
    hints = _resolved_hints(cls)
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        if _is_config(tp):
            out.update(flag_paths(tp, prefix + (f.name,)))
        else:
            out[f.name] = prefix + (f.name,)
    return out


def from_flags(cls: type[C], flags: dict[str, Any]) -> C:
    """A config from keyword arguments named as its command's flags (the Python API's
    ``effray.train(epochs=3, augment="standard")``): unknown names fail in one line."""
    paths = flag_paths(cls)
    unknown = sorted(set(flags) - set(paths))
    if unknown:
        raise EffrayError(f"unknown keyword(s) {', '.join(unknown)}; valid: {', '.join(sorted(paths))}")
    nested: dict[str, Any] = {}
    for name, value in flags.items():
        *parents, leaf = paths[name]
        into = nested
        for p in parents:
            into = into.setdefault(p, {})
        into[leaf] = list(value) if isinstance(value, tuple) else value
    return from_dict(cls, nested)


def merge(cfg: C, overrides: dict[str, Any]) -> C:
    """A copy of ``cfg`` with nested ``overrides`` applied (strict), e.g. a Tune trial's sample."""
    return from_dict(type(cfg), deep_update(to_dict(cfg), overrides))


def deep_update(into: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    """``into`` with ``upd`` applied in place, nested mappings merged key by key."""
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_update(into[k], v)
        else:
            into[k] = v
    return into


def require(condition: bool, message: str) -> None:
    """Raise a one-line :class:`EffrayError` unless ``condition`` holds."""
    if not condition:
        raise EffrayError(message)


def require_whole_gpus(workers: int, gpus_per_worker: float, flag: str = "--gpus-per-worker") -> None:
    """NCCL runs one rank per GPU: with several workers, a fraction (two ranks sharing a GPU)
    or a GPU and a half is refused in one line, before any worker starts."""
    g = float(gpus_per_worker)
    require(
        workers <= 1 or g == 0 or g.is_integer(),
        f"{flag} {g:g} with {workers} workers would put NCCL ranks on a shared or split GPU, which NCCL refuses; "
        f"give each worker whole GPUs ({flag} 1) or train on CPUs ({flag} 0)",
    )
