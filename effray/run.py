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
from effray.console import bar, follow_jsonl, say
from effray.data.pipeline import DataConfig
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.errors import EffrayError
from effray.search.aggregate import ReportConfig, report
from effray.search.run import TuneConfig, trial_count, tune_compression
from effray.train import train
from effray.train.config import TrainConfig

# demo: ~10 minutes on a 2-core CPU box with the real CIFAR-10 file; cifar10: a GPU cluster
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "prepare": {"limit": 10000, "val_fraction": 0.1},
        "train": {"model": "convnet", "width": 0.5, "epochs": 6, "batch_size": 128, "lr": 0.05,
                  "workers": 2, "data_cpus": 1.0, "data": {"augment": "standard"}},
        "tune": {"space": "demo", "search": "grid", "num_samples": 1, "cpus_per_trial": 1.0, "scheduler": "pareto",
                 "grace_period": 1},
    },  # fmt: skip
    "cifar10": {
        "prepare": {"limit": 0, "val_fraction": 0.1},
        "train": {"model": "resnet20", "epochs": 60, "batch_size": 512, "lr": 0.4, "workers": 4,
                  "gpus_per_worker": 1.0, "cpus_per_worker": 4.0, "data_cpus": 1.0,
                  "data": {"augment": "standard"}},
        "tune": {"space": "cifar10", "num_samples": 32, "gpus_per_trial": 1.0, "cpus_per_trial": 4.0,
                 "scheduler": "pareto", "grace_period": 2},
    },  # fmt: skip
}


@dataclass(frozen=True)
class RunConfig:
    """The main job: a preset, the source of the images, and where everything goes."""

    preset: str = option("demo", "demo (minutes on a CPU box) or cifar10 (the full run for a GPU cluster)", choices=tuple(PRESETS))
    source: str = option("../shared/data/cifar10-train.parquet", "images to start from (any `effray data prepare --source`)")
    out: str = option("runs/demo", "directory for the dataset, teacher, experiment and report (shared storage on a cluster)")
    max_size_kb: float = option(0.0, "search only configs predicted to fit this many KB on disk, and pick the most accurate that does (0 = no limit)")
    wandb: bool = option(False, "log the teacher's training and every compression trial (+ the search's summary) to Weights & Biases (offline without a key)")

    def validate(self) -> None:
        require(bool(self.source), "--source is required")
        require(self.max_size_kb >= 0, f"--max-size-kb must be >= 0, got {self.max_size_kb}")


def _stage(name: str) -> float:
    say(f"[effray run] {name} ...")
    return time.time()


def _teacher_bar(run_dir: Path, epochs: int) -> Any:
    """The teacher's epochs as a bar, from rank 0's ``history.jsonl`` (its lines go to Ray's log)."""
    from effray.train.loop import HISTORY_FILE

    progress = bar(epochs, "teacher", "epoch")

    def on_record(record: dict[str, Any]) -> None:
        progress.n = min(epochs, int(record["epoch"]))
        progress.set_postfix_str(f"val_acc {record['val_accuracy']:.4f}  {record.get('images_per_s', 0):,.0f} img/s")
        progress.refresh()

    return progress, follow_jsonl(run_dir / HISTORY_FILE, on_record)


def front_table(results: str | os.PathLike, teacher: dict[str, Any] | None = None) -> list[str]:
    """The accuracy-vs-bytes front of a report's results, as terminal lines."""
    import pandas as pd

    table = pd.read_parquet(results)
    front = table[table["pareto_bytes"]].sort_values("bytes")
    size = teacher.get("bytes") if teacher else None
    lines = [f"  {'trial':<12}{'accuracy':>9}{'KB':>9}{'smaller':>9}{'MACs':>12}{'ms (b1)':>9}  config"]
    for _, r in front.iterrows():
        how = ", ".join(x for x in (
            f"{r.get('config.compress.prune_kind', '')} {r['config.compress.prune_rate']:.2f}" if r.get("config.compress.prune_rate") else "",
            f"{int(r['config.compress.bits'])}-bit" if r.get("config.compress.bits", 32) != 32 else "",
            f"KD T={r['config.compress.kd_temperature']:g}" if r.get("config.compress.kd_alpha") else "") if x)  # fmt: skip
        smaller = f"{size / r['bytes']:.1f}x" if size else ""
        lines.append(f"  {r['trial_id']:<12}{r['accuracy']:>9.4f}{r['bytes'] / 1024:>9.1f}{smaller:>9}"
                     f"{int(r['macs']):>12,}{r['latency_ms']:>9.3f}  {how}")  # fmt: skip
    return lines


def run_all(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage; returns where the report and the best artifacts are."""
    preset = PRESETS[cfg.preset]
    out = Path(os.path.abspath(cfg.out))
    data_dir = out / "data"
    timings: dict[str, float] = {}

    from effray.search.progress import TrialProgress

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
    progress, follow = _teacher_bar(out / "teacher" / "teacher", train_cfg.epochs)
    with follow:
        trained = train(train_cfg)
    progress.close()
    teacher = trained.get("checkpoint")
    if not teacher:
        raise EffrayError(f"the teacher run in {out / 'teacher'} produced no checkpoint; see its log above")
    timings["train_s"] = time.time() - t
    say(f"[effray run] teacher: val accuracy {trained.get('val_accuracy', float('nan')):.4f} ({timings['train_s']:.0f} s)")

    t = _stage("search the compression space")
    tune_cfg = merge(TuneConfig(teacher=str(teacher), data=str(data_dir), storage=str(out), name="compress",
                                wandb=cfg.wandb, max_size_kb=cfg.max_size_kb), preset["tune"])  # fmt: skip
    searched = tune_compression(tune_cfg, callbacks=[TrialProgress(trial_count(tune_cfg))])
    timings["tune_s"] = time.time() - t
    say(f"[effray run] search: {searched['measured']} measured, {searched['stopped_early']} stopped early, "
        f"{searched['errored']} errored ({timings['tune_s']:.0f} s)")  # fmt: skip

    t = _stage("report")
    summary = report(ReportConfig(experiment=searched["experiment"], max_size_kb=cfg.max_size_kb))
    timings["report_s"] = time.time() - t
    results = Path(summary["report"]).with_name("results.parquet")
    say(f"[effray run] the front ({summary['pareto'].get('bytes', 0)} non-dominated of {summary['trials']} measured, "
        f"hypervolume {summary.get('hypervolume', float('nan')):.4f}):")  # fmt: skip
    for line in front_table(results, searched.get("teacher")):
        say(line)
    say(f"[effray run] report: {summary['report']}")
    return {
        "report": summary["report"], "pareto_png": str(Path(summary["report"]).with_name("pareto.png")),
        "teacher": {"checkpoint": teacher, "val_accuracy": trained.get("val_accuracy")},
        "trials": summary["trials"], "front": summary["pareto"].get("bytes", 0),
        "hypervolume": summary.get("hypervolume"), "best_accuracy": summary["best_accuracy"],
        "budget_pick": summary.get("budget_pick"), "seconds": {k: round(v, 1) for k, v in timings.items()},
    }  # fmt: skip
