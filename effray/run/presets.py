"""``effray run``'s presets: each stage's settings, by name or from a YAML file.

A preset has a section per stage (:data:`STAGES`), each holding that stage's config
fields nested as in the config (``train: {data: {augment: strong}}``); a YAML preset may
start from a built-in one (``base``). Unknown sections fail in one line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from effray.config import deep_update, require
from effray.errors import EffrayError

# demo: minutes on a CPU box with the real CIFAR-10 file; cifar10: a GPU cluster
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "prepare": {"limit": 10000, "val_fraction": 0.1, "test_fraction": 0.1},
        "clean": {"near": False, "labels": False},  # exact copies and leaks: one hash pass, seconds
        "train": {
            "model": "convnet",
            "width": 0.5,
            "epochs": 6,
            "batch_size": 128,
            "lr": 0.05,
            "workers": 2,
            "data_cpus": 1.0,
            "data": {"augment": "standard"},
        },
        "tune": {
            "space": "demo",
            "search": "grid",
            "num_samples": 1,
            "cpus_per_trial": 1.0,
            "scheduler": "pareto",
            "grace_period": 1,
        },
    },
    "cifar10": {
        "prepare": {"limit": 0, "val_fraction": 0.1, "test_fraction": 0.1},
        "clean": {"near": True, "labels": False, "gpus_per_actor": 1.0},  # + near copies, embedded on GPUs
        "train": {
            "model": "resnet20",
            "epochs": 60,
            "batch_size": 512,
            "lr": 0.4,
            "workers": 4,
            "gpus_per_worker": 1.0,
            "cpus_per_worker": 4.0,
            "data_cpus": 1.0,
            "data": {"augment": "standard"},
        },
        "tune": {
            "space": "cifar10",
            "num_samples": 32,
            "gpus_per_trial": 1.0,
            "cpus_per_trial": 4.0,
            "scheduler": "pareto",
            "grace_period": 2,
        },
    },
}

STAGES = ("prepare", "clean", "train", "tune")  # a preset's sections, each its stage config's fields
SHIPPED = Path(__file__).with_name("shipped")  # presets written as YAML, shipped in the package, named by file


def _shipped() -> None:
    """Add the package's YAML presets (``imagenette-resnet50``) to :data:`PRESETS` by name, so a
    user's YAML can start from them (``base: imagenette-resnet50``)."""
    import yaml

    for path in sorted(SHIPPED.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        PRESETS[path.stem] = {stage: dict(doc.get(stage) or {}) for stage in STAGES}


_shipped()


def load_preset(spec: str) -> dict[str, dict[str, Any]]:
    """A built-in preset by name, or a YAML file of the same shape: ``prepare``, ``clean``,
    ``train`` and ``tune`` sections holding those stages' config fields (nested as in the configs,
    e.g. ``train: {data: {augment: strong}}``), on top of an optional ``base`` preset
    (``demo`` or ``cifar10``; without one, the configs' own defaults)."""
    if spec in PRESETS:
        return copy.deepcopy(PRESETS[spec])
    import yaml

    path = Path(spec).expanduser()
    require(
        path.suffix in (".yaml", ".yml") and path.is_file(),
        f"--preset {spec}: neither a built-in preset ({', '.join(PRESETS)}) nor a YAML file that exists",
    )
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = (str(exc).strip().splitlines() or ["invalid YAML"])[0]
        raise EffrayError(f"--preset {path}: not valid YAML ({first}); fix the file") from None
    require(
        isinstance(doc, dict),
        f"--preset {path}: expected a mapping with {', '.join(STAGES)} sections, got {type(doc).__name__}",
    )
    unknown = sorted(set(doc) - {"base", *STAGES})
    require(
        not unknown,
        f"--preset {path}: unknown section(s) {', '.join(map(str, unknown))}; a preset has base, {', '.join(STAGES)}",
    )
    base = doc.get("base")
    require(
        base is None or base in PRESETS,
        f"--preset {path}: base {base!r} is not a built-in preset; use one of {', '.join(PRESETS)}",
    )
    preset = copy.deepcopy(PRESETS[base]) if base else {stage: {} for stage in STAGES}
    for stage in STAGES:
        section = doc.get(stage) or {}
        require(isinstance(section, dict), f"--preset {path}: section {stage} must be a mapping of {stage} settings")
        preset[stage] = deep_update(copy.deepcopy(preset.get(stage, {})), section)
    return preset
