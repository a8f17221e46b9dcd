"""The compression search space: written once over :class:`CompressConfig`'s fields.

A space maps field names to a constant or one distribution::

    prune_rate: {uniform: [0.3, 0.9]}
    prune_kind: {choice: [unstructured, structured]}
    bits: {choice: [2, 4, 8]}
    kd_temperature: {loguniform: [1.0, 8.0]}
    student: {choice: ["", resnet20]}
    finetune_epochs: 2

It is validated before anything runs (every key a field, every choice and both ends of
every range a valid config) and then becomes Ray Tune's ``param_space`` under
``"compress"``, so a trial's config is ``merge(base, config["compress"])``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from effray.compress.config import CompressConfig
from effray.config import merge, require
from effray.errors import EffrayError

SEARCH_PROBES = "(the search's sensitivity pass)"
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
PRESETS: dict[str, dict[str, Any]] = {
    # a search one CPU machine runs: one trial per (pruning kind, prune rate, bits), configs
    # spread along the size axis so the front has points all along it; LR drawn; KD on
    # (--search grid)
    "demo": {
        "prune_kind": {"grid": ["unstructured", "structured"]},
        "prune_rate": {"grid": [0.5, 0.8]},
        "bits": {"grid": [2, 4, 8]},
        "kd_alpha": 0.7,
        "kd_temperature": 4.0,
        "finetune_epochs": 2,
        "finetune_lr": {"loguniform": [0.005, 0.03]},
    },
    # the full space a GPU cluster would search
    "cifar10": {
        "prune_kind": {"choice": ["unstructured", "structured"]},
        "prune_rate": {"uniform": [0.2, 0.95]},
        "prune_schedule": {"choice": ["oneshot", "cubic"]},
        "prune_steps": {"choice": [1, 3]},
        "bits": {"choice": [2, 3, 4, 6, 8]},
        "first_layer_bits": {"choice": [4, 8]},
        "last_layer_bits": {"choice": [4, 8]},
        "kd_alpha": {"choice": [0.0, 0.5, 0.9]},
        "kd_temperature": {"loguniform": [1.0, 8.0]},
        "student": {"choice": ["", "resnet20"]},
        "finetune_epochs": {"choice": [10, 20]},
        "finetune_lr": {"loguniform": [0.003, 0.05]},
    },
    # the worked example's (the imagenette-resnet50 preset): a torchvision ResNet-18 distilled
    # from the ResNet-50 teacher (logits, and with or without its last two stages' features
    # through 1x1 projections), its channels pruned through the residual graph and quantized
    "imagenette-resnet18": {
        "student": "torchvision:resnet18",
        "kd_features": {"choice": ["", "layer3,layer4"]},
        "prune_kind": "structured",
        "prune_rate": {"uniform": [0.1, 0.6]},
        "prune_schedule": {"choice": ["oneshot", "cubic"]},
        "bits": {"choice": [4, 6, 8]},
        "kd_alpha": {"choice": [0.5, 0.9]},
        "kd_temperature": {"loguniform": [1.0, 8.0]},
        "finetune_epochs": {"choice": [10, 20]},
        "finetune_lr": {"loguniform": [0.003, 0.05]},
    },
}


def load_space(text: str) -> dict[str, Any]:
    """A preset name or a YAML file path -> the validated space."""
    if text in PRESETS:
        space = PRESETS[text]
    else:
        path = Path(text)
        if not path.is_file():
            raise EffrayError(f"--space {text!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        try:
            space = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise EffrayError(f"--space {text}: invalid YAML ({str(exc).splitlines()[0]})") from None
    validate_space(space)
    return space


def resolve_search(search: str, space: dict[str, Any]) -> str:
    """``--search`` for ``space``: ``auto`` is grid when the space has grid entries (only a
    grid search enumerates them), else random; another searcher of a grid space fails in
    one line."""
    if search == "auto":
        return "grid" if has_grid(space) else "random"
    require(
        search == "grid" or not has_grid(space),
        f"the space has grid entries, which --search {search} can't enumerate; use --search grid or auto "
        "(or choice instead of grid)",
    )
    return search


def _values(name: str, spec: Any) -> tuple[str, list[Any]]:
    """(kind, the values whose validity proves the whole range valid)."""
    if not isinstance(spec, dict):
        return "constant", [spec]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise EffrayError(
            f"space entry {name}: {spec!r} must be a constant or one of {{{', '.join(DISTRIBUTIONS)}: ...}}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise EffrayError(f"space entry {name}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return kind, args
    if len(args) != (3 if kind == "quniform" else 2) or not all(isinstance(a, (int, float)) for a in args):
        raise EffrayError(
            f"space entry {name}: {kind} takes [low, high{', q' if kind == 'quniform' else ''}] numbers, got {args!r}"
        )
    low, high = args[0], args[1]
    if not low < high or (kind == "loguniform" and low <= 0):
        raise EffrayError(f"space entry {name}: {kind} needs 0 < low < high (log) or low < high, got {args!r}")
    return kind, ([low, high - 1] if kind == "randint" else [low, high])


def validate_space(space: Any, base: CompressConfig | None = None) -> None:
    """Every key a CompressConfig field, every value (each choice, both range ends) valid."""
    if not isinstance(space, dict) or not space:
        raise EffrayError("the search space must be a non-empty mapping of CompressConfig fields")
    fields = {f.name for f in dataclasses.fields(CompressConfig)} - {"teacher"}
    unknown = sorted(set(space) - fields)
    if unknown:
        raise EffrayError(f"unknown search-space key(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    base = base or CompressConfig()
    if not space.get("sensitivity"):  # the search probes the teacher for an allocation that names no table
        base = dataclasses.replace(base, sensitivity=SEARCH_PROBES)
    for name, spec in space.items():
        _, values = _values(name, spec)
        for value in values:
            try:
                merge(base, {name: value})
            except EffrayError as exc:
                raise EffrayError(f"space entry {name}={value!r} is invalid: {exc}") from None
            except TypeError:
                raise EffrayError(f"space entry {name}={value!r} has the wrong type") from None


def to_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` (``{"compress": {...}}``) for a validated space."""
    from ray import tune

    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "quniform": lambda a: tune.quniform(*a),
    }
    out = {}
    for name, spec in space.items():
        kind = next(iter(spec)) if isinstance(spec, dict) else None
        out[name] = make[kind](spec[kind]) if kind else spec
    return {"compress": out}


def has_grid(space: dict[str, Any]) -> bool:
    """Whether the space has grid entries, which only ``--search grid`` enumerates."""
    return any(isinstance(s, dict) and "grid" in s for s in space.values())
