"""What every trial of one search shares, built once on the driver.

The teacher is loaded and measured here, once, rather than in every trial: its scores
are the denominators of every trial's ratios and the baseline of its corruption column.
The result is one frozen :class:`TrialContext` that travels to the trials through
``tune.with_parameters`` (pickled into the object store), while each trial's own config
comes from the Tune space. Restoring a search builds the context afresh, so a moved
dataset or teacher is picked up without touching Tune's saved state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from effray.compress.config import CompressConfig
from effray.compress.run import teacher_baseline, teacher_input
from effray.config import merge, require
from effray.data.arrays import eval_batches, load_arrays
from effray.data.corrupt import parse_corruptions, parse_severities
from effray.data.prepare import load_meta
from effray.models.reference import provided
from effray.search.config import TuneConfig
from effray.search.deployed import DeployProbe
from effray.train.checkpoint import data_summary, load_checkpoint
from effray.train.validate import CorruptionScore


def corruption_score(cfg: TuneConfig) -> CorruptionScore | None:
    """The corruption score of every trial's final artifact, on the teacher's corruptions,
    severities and images (chosen by ``seed``), so the drop is fair; scored after every
    epoch too when ``--max-corruption-drop`` asks the scheduler to hold it. None when
    ``--robust-images 0`` turns the column off."""
    if not cfg.robust_images:
        return None
    return CorruptionScore(
        corruptions=tuple(parse_corruptions(cfg.robust_corruptions)),
        severities=tuple(parse_severities(cfg.robust_severities)),
        images=cfg.robust_images,
        seed=cfg.seed,
        every_epoch=bool(cfg.limits.max_corruption_drop),
    )


@dataclass(frozen=True)
class TeacherBaseline:
    """The teacher as every trial sees it: where it is, its fp32 artifact measured (every
    ratio's denominator, ``teacher.json``) and what an artifact records of it."""

    path: str
    metrics: dict[str, Any]
    info: dict[str, Any]
    model_input: dict[str, Any] = field(default_factory=dict)  # its input size and preprocessing: every student's


@dataclass(frozen=True)
class TrialWorkers:
    """A trial's Ray Train run (``--workers-per-trial`` > 1): its workers and what each reserves."""

    count: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled config, the same for every trial."""

    name: str  # the experiment's: trial run names, Ray Train run names, the wandb group
    storage: str  # the storage root, which seeds the trials' stable wandb ids
    experiment: str  # the experiment's directory or URI, holding each trial's
    data: str  # the prepared dataset (absolute)
    data_info: dict[str, Any]  # what an artifact records of the data (effray.train.checkpoint.data_summary)
    augment: str
    seed: int
    eval_batch_size: int
    base: CompressConfig  # every trial's config before its sample is applied
    teacher: TeacherBaseline
    robust: CorruptionScore | None
    workers: TrialWorkers
    wandb_project: str
    wandb_mode: str  # decided once on the driver; "disabled" tracks nothing
    factories: dict[str, Any] = field(default_factory=dict)  # the Python API's model factories, by reference
    deploy: DeployProbe | None = None  # exports and times every measured trial (None: --deploy off)
    objective: str = "bytes"  # the scheduler's cost: "latency" has a trial time its export once its weights are final

    def meta(self) -> dict[str, Any]:
        """The dataset's meta.json with the teacher's preprocessing: what a trial's batches
        are made with (rows stored at another size than the teacher takes are brought to it)."""
        return {**load_meta(self.data), "preprocess": self.data_info.get("preprocess")}

    def compress_config(self, sample: dict[str, Any]) -> CompressConfig:
        """The trial's :class:`CompressConfig`: the base with the Tune space's sample applied,
        rebuilt and validated through :func:`effray.config.from_dict`."""
        return merge(self.base, sample)

    @property
    def local(self) -> bool:
        """Whether the experiment is a directory here (not cloud storage)."""
        return "://" not in self.experiment

    def trial_dir(self, trial_id: str) -> str:
        """The trial's directory in the experiment's storage (a path or a URI)."""
        return f"{self.experiment}/trial_{trial_id}"

    def run_name(self, trial_id: str) -> str:
        """The trial's name in wandb and its Ray Train run's: deterministic, so a retried
        trial finds both again."""
        return f"{self.name}-{trial_id}"


def measure_teacher(cfg: TuneConfig, meta: dict[str, Any], robust: CorruptionScore | None) -> TeacherBaseline:
    """Load and measure the teacher once, on the driver, refusing one that predicts another
    dataset's classes."""
    teacher, payload = load_checkpoint(cfg.teacher, cfg.trust_code)
    meta = teacher_input(meta, payload)
    spec = dict(teacher.spec)
    require(
        spec["num_classes"] == meta["num_classes"],
        f"teacher {cfg.teacher} predicts {spec['num_classes']} classes, {cfg.data} has {meta['num_classes']}; use "
        "the dataset it was trained on",
    )
    val = load_arrays(cfg.data, "val")
    metrics, info = teacher_baseline(teacher, cfg.teacher, eval_batches(val, meta, cfg.eval_batch_size))
    if robust is not None:  # the baseline of every trial's corruption column
        metrics["corruption_accuracy"] = robust.score(teacher, val, meta)
    return TeacherBaseline(path=info["path"], metrics=metrics, info=info, model_input=meta["model_input"])


def trial_context(cfg: TuneConfig, meta: dict[str, Any], wandb_mode: str) -> TrialContext:
    """The context of ``cfg``'s trials, the teacher measured (``wandb_mode``: decided by the driver)."""
    robust = corruption_score(cfg)
    teacher = measure_teacher(cfg, meta, robust)
    return TrialContext(
        name=cfg.name,
        storage=cfg.storage_root,
        experiment=cfg.experiment,
        data=os.path.abspath(cfg.data),
        data_info=data_summary(meta, teacher.model_input),
        augment=cfg.augment,
        seed=cfg.seed,
        eval_batch_size=cfg.eval_batch_size,
        base=CompressConfig(teacher=teacher.path),
        teacher=teacher,
        robust=robust,
        workers=TrialWorkers(cfg.workers_per_trial, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.data_cpus),
        wandb_project=cfg.wandb_project,
        wandb_mode=wandb_mode,
        factories=provided(),
    )
