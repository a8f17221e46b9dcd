"""``effray run``: the whole chain on the current Ray cluster, one stage after another.

prepare -> train the teacher -> Tune the compression space -> report. Each stage is the
same function its own command calls, with the preset's settings; every stage resumes,
so running the command again after an interruption continues where it stopped (the
dataset is reused, the teacher run and the Tune experiment resume by name).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.config import merge, option, require
from effray.data.pipeline import DataConfig
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.errors import EffrayError
from effray.search.aggregate import ReportConfig, report
from effray.search.run import TuneConfig, tune_compression
from effray.train import train
from effray.train.config import TrainConfig

# demo: ~10 minutes on a 2-core CPU box with the real CIFAR-10 file; cifar10: a GPU cluster
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "prepare": {"limit": 10000, "val_fraction": 0.1},
        "train": {"model": "convnet", "width": 0.5, "epochs": 6, "batch_size": 128, "lr": 0.05,
                  "workers": 2, "cpus_per_worker": 0.5, "data_cpus": 1.0, "data": {"augment": "standard"}},
        "tune": {"space": "demo", "num_samples": 6, "max_concurrent": 1, "cpus_per_trial": 1.0,
                 "scheduler": "asha", "grace_period": 1},
    },  # fmt: skip
    "cifar10": {
        "prepare": {"limit": 0, "val_fraction": 0.1},
        "train": {"model": "resnet20", "epochs": 60, "batch_size": 512, "lr": 0.4, "workers": 4,
                  "gpus_per_worker": 1.0, "cpus_per_worker": 4.0, "data_cpus": 1.0,
                  "data": {"augment": "standard"}},
        "tune": {"space": "cifar10", "num_samples": 32, "gpus_per_trial": 1.0, "cpus_per_trial": 4.0,
                 "scheduler": "asha", "grace_period": 2},
    },  # fmt: skip
}


@dataclass(frozen=True)
class RunConfig:
    """The main job: a preset, the source of the images, and where everything goes."""

    preset: str = option("demo", "demo (minutes on a CPU box) or cifar10 (the full run for a GPU cluster)", choices=tuple(PRESETS))
    source: str = option("../shared/data/cifar10-train.parquet", "images to start from (any `effray data prepare --source`)")
    out: str = option("runs/demo", "directory for the dataset, teacher, experiment and report (shared storage on a cluster)")
    max_size_kb: float = option(0.0, "also pick the most accurate model at most this many KB on disk (0 = no pick)")
    wandb: bool = option(False, "log the teacher's training and every compression trial (+ the search's summary) to Weights & Biases (offline without a key)")

    def validate(self) -> None:
        require(bool(self.source), "--source is required")
        require(self.max_size_kb >= 0, f"--max-size-kb must be >= 0, got {self.max_size_kb}")


def _stage(name: str) -> float:
    print(f"[effray run] {name} ...", flush=True)
    return time.time()


def run_all(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage; returns where the report and the best artifacts are."""
    preset = PRESETS[cfg.preset]
    out = Path(os.path.abspath(cfg.out))
    data_dir = out / "data"
    timings: dict[str, float] = {}

    t = _stage("prepare")
    if (data_dir / "meta.json").is_file():
        meta = load_meta(data_dir)
        require(meta["source"].endswith(cfg.source.split(":", 1)[-1].lstrip("./")) or cfg.source in meta["source"],
                f"{data_dir} was prepared from {meta['source']}, not {cfg.source}; use another --out")  # fmt: skip
    else:
        prepare(merge(PrepareConfig(source=cfg.source, out=str(data_dir)), preset["prepare"]))
    timings["prepare_s"] = time.time() - t

    t = _stage("train the teacher")
    train_cfg = merge(TrainConfig(data=DataConfig(data=str(data_dir)), storage=str(out / "teacher"), name="teacher",
                                  wandb=cfg.wandb), preset["train"])  # fmt: skip
    trained = train(train_cfg)
    teacher = trained.get("checkpoint")
    if not teacher:
        raise EffrayError(f"the teacher run in {out / 'teacher'} produced no checkpoint; see its log above")
    timings["train_s"] = time.time() - t

    t = _stage("search the compression space")
    tune_cfg = merge(TuneConfig(teacher=str(teacher), data=str(data_dir), storage=str(out), name="compress",
                                wandb=cfg.wandb), preset["tune"])  # fmt: skip
    searched = tune_compression(tune_cfg)
    timings["tune_s"] = time.time() - t

    t = _stage("report")
    summary = report(ReportConfig(experiment=searched["experiment"], max_size_kb=cfg.max_size_kb))
    timings["report_s"] = time.time() - t
    return {
        "report": summary["report"], "pareto_png": str(Path(summary["report"]).with_name("pareto.png")),
        "teacher": {"checkpoint": teacher, "val_accuracy": trained.get("val_accuracy")},
        "trials": summary["trials"], "best_accuracy": summary["best_accuracy"],
        "budget_pick": summary.get("budget_pick"), "seconds": {k: round(v, 1) for k, v in timings.items()},
    }  # fmt: skip
