"""``effray run``'s config and its plan: every stage's config built from the preset, and
checked (the search space, the cluster's node types) before the first stage runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.clean.config import CleanConfig
from effray.cluster import fit_problems, launcher_node_types
from effray.config import merge, option, require, to_dict
from effray.data.pipeline import DataConfig
from effray.data.prepare import PrepareConfig
from effray.errors import EffrayError
from effray.run.presets import STAGES, load_preset
from effray.search.config import TuneConfig
from effray.search.resources import check_trial_resources
from effray.search.space import load_space, resolve_search
from effray.train.config import TrainConfig
from effray.train.trainer import check_resources, fit_cpus_per_worker

SOURCE = "../shared/data/cifar10-train.parquet"


@dataclass(frozen=True)
class RunConfig:
    """The main job: a preset, the source of the images, and where everything goes."""

    preset: str = option(
        "demo",
        "demo (minutes on a CPU box), cifar10 (the full run for a GPU cluster), imagenette-resnet50 (the worked "
        "example: a torchvision ResNet-50 teacher, --weights or trained here, distilled into a ResNet-18, pruned and "
        "quantized; a GPU cluster's run) or a YAML file (base, prepare, train, tune sections)",
    )
    source: str = option(
        SOURCE,
        "images to start from (any `effray data prepare --source`; a preset may name its own, which this overrides)",
    )
    out: str = option(
        "runs/demo", "directory for the dataset, teacher, experiment and report (shared storage on a cluster)"
    )
    max_size_kb: float = option(
        0.0,
        "search only configs predicted to fit this many KB on disk, and pick the most accurate that does (0 = no "
        "limit)",
    )
    wandb: bool = option(
        False,
        "log the teacher's training and every compression trial (+ the search's summary) to Weights & Biases "
        "(offline without a key)",
    )
    clean: str = option(
        "report",
        "the cleaning stage: report (flag duplicates and leaks before the teacher, label issues on val from the "
        "teacher; drop nothing), off, or drop=duplicates,leaks (those train rows leave before the teacher trains)",
    )
    weights: str = option(
        "",
        "start the teacher from this state dict (.pt/.pth weights-only or .safetensors, e.g. ImageNet weights of the "
        "preset's model; a classifier of another size is re-initialised); the preset's train section fine-tunes it",
    )
    cluster_config: str = option(
        "",
        "a Ray cluster launcher YAML (e.g. cluster.yaml): fail before anything runs if the teacher's workers or a "
        "search trial can't fit its node types",
    )

    def validate(self) -> None:
        require(bool(self.source), "--source is required")
        require(self.max_size_kb >= 0, f"--max-size-kb must be >= 0, got {self.max_size_kb}")
        require(
            self.clean in ("report", "off") or self.clean.startswith("drop="),
            f"--clean {self.clean!r}: use report, off or drop=duplicates,leaks",
        )
        require(
            "labels" not in self.clean.removeprefix("drop=").split(","),
            "--clean drop=labels: label issues are found with the teacher, after it trained; drop duplicates/leaks, "
            "or run `effray data clean --drop labels` (K-fold) first",
        )
        plan = plan_stages(self)  # the preset, every stage's config and the search space: checked before anything runs
        if self.cluster_config:
            require(Path(self.cluster_config).is_file(), f"--cluster-config {self.cluster_config} does not exist")
            problems = fit_problems(resource_requests(plan), launcher_node_types(self.cluster_config))
            require(not problems, f"--preset {self.preset} doesn't fit {self.cluster_config}: {'; '.join(problems)}")

    def plan(self) -> dict[str, Any]:
        """What ``--dry-run`` prints besides the flags: every stage's resolved config."""

        plan = plan_stages(self)
        requests = {
            what: {"bundle": dict(bundle), "copies": copies}
            for what, (bundle, copies) in resource_requests(plan).items()
        }
        return {**{stage: to_dict(getattr(plan, stage)) for stage in STAGES}, "resources": requests}


@dataclass(frozen=True)
class StagePlan:
    """The configs every stage of ``effray run`` will run with, built (and validated) before
    the first one starts; ``tune.teacher`` is where the teacher's checkpoint will be."""

    prepare: PrepareConfig
    clean: CleanConfig
    train: TrainConfig
    tune: TuneConfig


def plan_stages(cfg: RunConfig) -> StagePlan:
    """``cfg``'s preset applied to each stage's config; a bad preset value fails here, in
    one line naming the section, before any stage has run."""

    preset, out = load_preset(cfg.preset), Path(os.path.abspath(cfg.out))

    def build(stage: str, base: Any) -> Any:
        try:
            return merge(base, preset.get(stage, {}))
        except EffrayError as exc:
            raise EffrayError(f"--preset {cfg.preset}: {stage}: {exc}") from None

    if cfg.source != SOURCE or "source" not in preset.get("prepare", {}):  # a --source given wins over the preset's
        preset.setdefault("prepare", {})["source"] = cfg.source
    data_dir, drop = out / "data", cfg.clean.removeprefix("drop=") if cfg.clean.startswith("drop=") else ""
    trained_on = out / "clean" / "data" if drop else data_dir  # dropped rows leave before the teacher trains
    plan = StagePlan(
        prepare=build("prepare", PrepareConfig(source=cfg.source, out=str(data_dir))),
        clean=build("clean", CleanConfig(data=str(data_dir), out=str(out / "clean"), drop=drop, overwrite=True)),
        train=build(
            "train",
            TrainConfig(
                data=DataConfig(data=str(trained_on)),
                storage=str(out / "teacher"),
                name="teacher",
                wandb=cfg.wandb,
                weights=os.path.abspath(cfg.weights) if cfg.weights else "",
            ),
        ),
        tune=build(
            "tune",
            TuneConfig(
                teacher=str(out / "teacher" / "teacher"),
                data=str(trained_on),
                storage=str(out),
                name="compress",
                wandb=cfg.wandb,
                max_size_kb=cfg.max_size_kb,
                # the teacher is this run's own, trained from the preset's --model: its code is the user's choice
                trust_code=True,
            ),
        ),
    )
    try:
        resolve_search(plan.tune.search, load_space(str(plan.tune.space)))
    except EffrayError as exc:
        raise EffrayError(f"--preset {cfg.preset}: tune: {exc}") from None
    return plan


def check_live_cluster(cfg: RunConfig, plan: StagePlan) -> None:
    """The teacher's fit and one trial against the cluster this run is connected to, before
    the first stage writes anything: a preset that asks for more than the cluster has fails
    in one line now, not after minutes of preparing and cleaning."""
    import ray

    total, nodes = ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for section, check in (
        ("train", lambda: check_resources(fit_cpus_per_worker(plan.train, total, nodes), total, nodes)),
        ("tune", lambda: check_trial_resources(plan.tune, total, nodes)),
    ):
        try:
            check()
        except EffrayError as exc:
            raise EffrayError(f"--preset {cfg.preset}: {section}: {exc}") from None


def resource_requests(plan: StagePlan) -> dict[str, tuple[dict[str, float], int]]:
    """What each stage asks Ray for: ``{what: (one bundle, how many)}``. The teacher's
    workers (an elastic run's most), a search trial's workers, a Ray Data task; a CPU
    count of 0 is ``auto``, which takes what is there."""
    train, tune = plan.train, plan.tune
    return {
        "the teacher's workers": (
            {"CPU": train.cpus_per_worker, "GPU": train.gpus_per_worker},
            max(train.workers, train.max_workers),
        ),
        "a search trial": ({"CPU": tune.cpus_per_worker, "GPU": tune.gpus_per_worker}, tune.workers_per_trial),
        "a data task": ({"CPU": train.data_cpus}, 1),
    }
