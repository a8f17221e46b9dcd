"""``effray run``: the whole chain on the current Ray cluster, one stage after another.

prepare -> clean -> train the teacher -> Tune the compression space -> report -> export the
front.
Each stage is the same function its own command calls, with the preset's settings; every
stage resumes, so running the command again after an interruption continues where it
stopped (the dataset is reused, the teacher run and the Tune experiment resume by name,
an export made from the same artifact is kept).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effray.atomic import write_file, write_json
from effray.clean.config import CleanConfig
from effray.clean.labels import label_issues, predict_probs
from effray.clean.run import clean
from effray.cluster import fit_problems, launcher_node_types
from effray.config import deep_update, merge, option, require, to_dict, validated
from effray.console import bar, follow_jsonl, say
from effray.data.arrays import load_arrays
from effray.data.pipeline import DataConfig
from effray.data.prepare import PrepareConfig, load_meta, prepare
from effray.deploy.export import ExportConfig, export
from effray.deploy.model import SIDECAR
from effray.errors import EffrayError
from effray.search.aggregate import ReportConfig, report
from effray.search.progress import TrialProgress
from effray.search.run import TuneConfig, trial_count, tune_compression
from effray.search.space import space_from_file_or_preset, validate_space
from effray.train import train
from effray.train.checkpoint import load_checkpoint
from effray.train.config import TrainConfig
from effray.train.loop import HISTORY_FILE

# demo: ~10 minutes on a 2-core CPU box with the real CIFAR-10 file; cifar10: a GPU cluster
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "prepare": {"limit": 10000, "val_fraction": 0.1},
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
        "prepare": {"limit": 0, "val_fraction": 0.1},
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

    data_dir, drop = out / "data", cfg.clean.removeprefix("drop=") if cfg.clean.startswith("drop=") else ""
    trained_on = out / "clean" / "data" if drop else data_dir  # dropped rows leave before the teacher trains
    plan = StagePlan(
        prepare=build("prepare", PrepareConfig(source=cfg.source, out=str(data_dir))),
        clean=build("clean", CleanConfig(data=str(data_dir), out=str(out / "clean"), drop=drop, overwrite=True)),
        train=build(
            "train",
            TrainConfig(
                data=DataConfig(data=str(trained_on)), storage=str(out / "teacher"), name="teacher", wandb=cfg.wandb
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
            ),
        ),
    )
    try:
        validate_space(space_from_file_or_preset(plan.tune.space))
    except EffrayError as exc:
        raise EffrayError(f"--preset {cfg.preset}: tune: {exc}") from None
    return plan


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


@dataclass(frozen=True)
class RunConfig:
    """The main job: a preset, the source of the images, and where everything goes."""

    preset: str = option(
        "demo",
        "demo (minutes on a CPU box), cifar10 (the full run for a GPU cluster) or a YAML file (base, prepare, train, "
        "tune sections)",
    )
    source: str = option(
        "../shared/data/cifar10-train.parquet", "images to start from (any `effray data prepare --source`)"
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


def _stage(name: str) -> float:
    say(f"[effray run] {name} ...")
    return time.time()


def _teacher_bar(run_dir: Path, epochs: int) -> Any:
    """The teacher's epochs as a bar, from rank 0's ``history.jsonl`` (its lines go to Ray's log)."""

    progress = bar(epochs, "teacher", "epoch")

    def on_record(record: dict[str, Any]) -> None:
        progress.n = min(epochs, int(record["epoch"]))
        progress.set_postfix_str(f"val_acc {record['val_accuracy']:.4f}  {record.get('images_per_s', 0):,.0f} img/s")
        progress.refresh()

    return progress, follow_jsonl(run_dir / HISTORY_FILE, on_record)


def config_summary(row: Any) -> str:
    """A results row's searched compression settings in words; a setting the search space
    fixed has no column, and is left out."""
    get = lambda key: row.get(f"config.compress.{key}")  # noqa: E731
    temperature = get("kd_temperature")
    return ", ".join(
        x
        for x in (
            f"{get('prune_kind') or ''} {get('prune_rate'):.2f}".strip() if get("prune_rate") else "",
            f"{int(get('bits'))}-bit" if get("bits") not in (None, 32) else "",
            ("KD" + (f" T={temperature:g}" if temperature is not None else "")) if get("kd_alpha") else "",
        )
        if x
    )


def front_table(
    results: str | os.PathLike, teacher: dict[str, Any] | None = None, pick: str | None = None
) -> list[str]:
    """The accuracy-vs-bytes front of a report's results, as terminal lines (``*``: the pick)."""
    import pandas as pd

    table = pd.read_parquet(results)
    front = table[table["pareto_bytes"]].sort_values("bytes")
    size = teacher.get("bytes") if teacher else None
    lines = [
        f"  {'trial':<10}{'accuracy':>9}{'macro-F1':>9}{'corrupt.':>9}{'KB':>8}{'smaller':>9}{'ms (b1)':>9}  config"
    ]
    for _, r in front.iterrows():
        how = config_summary(r)
        smaller = f"{size / r['bytes']:.1f}x" if size else ""
        corrupt = (
            f"{r['corruption_accuracy']:.4f}" if r.get("corruption_accuracy") == r.get("corruption_accuracy") else "-"
        )
        star = "*" if r["trial_id"] == pick else " "
        lines.append(
            f" {star}{r['trial_id']:<10}{r['accuracy']:>9.4f}{r.get('macro_f1', float('nan')):>9.4f}{corrupt:>9}"
            f"{r['bytes'] / 1024:>8.1f}{smaller:>9}{r['latency_ms']:>9.3f}  {how}"
        )
    return lines


def export_front(results: str | os.PathLike, pick: str | None, out: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    """Export every model on the accuracy-vs-bytes front (and the budget pick, with its int8
    files) to ``out/<trial_id>`` as ``.pt2`` + ONNX, each parity-checked by
    :func:`effray.deploy.export.export`. ``out/exports.json`` records what was done, so a
    re-run keeps an export made from the same artifact (an int8 file that failed its check
    is not retried). A model that fails its check is reported, not fatal (the pick falls
    back to its fp32 files). Returns ``{trial_id: {"dir", "int8", "error"}}``."""
    import json

    import pandas as pd

    table = pd.read_parquet(results)
    ids = list(dict.fromkeys(list(table.loc[table["pareto_bytes"], "trial_id"]) + ([pick] if pick else [])))
    state_file = out / "exports.json"
    state: dict[str, dict[str, Any]] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    done: dict[str, dict[str, Any]] = {}
    progress = bar(len(ids), "export", "model")
    for tid in ids:
        artifact = str(Path(table.loc[table["trial_id"] == tid, "artifact"].iloc[0]).resolve())
        dest, int8 = out / tid, tid == pick
        kept = state.get(tid, {})
        ok = kept.get("artifact") == artifact and (dest / SIDECAR).is_file() and (kept.get("int8_tried") or not int8)
        if not ok:
            record = {"dir": str(dest), "int8": False, "error": "", "artifact": artifact, "int8_tried": int8}
            for attempt in (True, False) if int8 else (False,):
                try:
                    export(
                        validated(
                            ExportConfig(
                                artifact=artifact, format="all", int8=attempt, data=str(data_dir), out=str(dest)
                            )
                        )
                    )
                    record.update(int8=attempt, error="")
                    break
                except EffrayError as exc:
                    record.update(int8=False, error=str(exc))
            state[tid] = record
            out.mkdir(parents=True, exist_ok=True)
            write_json(state_file, state)
        done[tid] = {k: state[tid][k] for k in ("dir", "int8", "error")}
        progress.update(1)
    progress.close()
    return done


def clean_stage(plan: StagePlan) -> dict[str, Any]:
    """``effray data clean`` with the preset's settings, kept if an earlier run made it with
    the same ones (``clean_report.json`` records them); returns the report's counts."""
    import json

    report = Path(plan.clean.out) / "clean_report.json"
    if report.is_file():
        kept = json.loads(report.read_text())
        if kept.get("settings") == plan.clean.settings():
            return {"counts": kept.get("counts", {}), "dropped": kept.get("dropped"), "kept": True}
    done = clean(plan.clean)
    return {"counts": done["counts"], "dropped": done["dropped"], "kept": False}


def val_label_issues(teacher: str, data_dir: str | os.PathLike, out: Path) -> int:
    """Label issues of the val split (cleanlab on the teacher's predictions: out of sample,
    it never trained on val), written to ``out`` as Parquet; returns how many."""
    import pandas as pd

    meta, val = load_meta(data_dir), load_arrays(data_dir, "val")
    model, _ = load_checkpoint(teacher)
    probs, _ = predict_probs(model, val, meta)
    classes = list(meta["classes"])
    rows = [
        {
            "split": "val",
            "index": int(val["index"][r["position"]]),
            "rank": r["rank"],
            "given": classes[r["given"]],
            "predicted": classes[r["predicted"]],
            "given_confidence": r["given_confidence"],
            "predicted_confidence": r["predicted_confidence"],
        }
        for r in label_issues(val["label"], probs)
    ]
    table = pd.DataFrame(
        rows, columns=["split", "index", "rank", "given", "predicted", "given_confidence", "predicted_confidence"]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, lambda tmp: table.to_parquet(tmp, index=False))
    return len(rows)


def _most_accurate(results: str | os.PathLike) -> str | None:
    """The front's most accurate model (of equally accurate ones, the smallest)."""
    import pandas as pd

    table = pd.read_parquet(results, columns=["trial_id", "accuracy", "bytes", "pareto_bytes"])
    front = table[table["pareto_bytes"]].sort_values(["accuracy", "bytes"], ascending=[False, True])
    return None if front.empty else str(front["trial_id"].iloc[0])


def run_all(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage; returns where the report and the best artifacts are."""
    plan = plan_stages(cfg)
    out = Path(os.path.abspath(cfg.out))
    data_dir = out / "data"
    timings: dict[str, float] = {}

    t = _stage("prepare")
    if (data_dir / "meta.json").is_file():
        meta = load_meta(data_dir)
        require(
            meta["source"].endswith(cfg.source.split(":", 1)[-1].lstrip("./")) or cfg.source in meta["source"],
            f"{data_dir} was prepared from {meta['source']}, not {cfg.source}; use another --out",
        )
    else:
        prepare(plan.prepare)
    timings["prepare_s"] = time.time() - t

    cleaned: dict[str, Any] = {}
    if cfg.clean != "off":
        t = _stage("clean")
        cleaned = clean_stage(plan)
        timings["clean_s"] = time.time() - t
        found = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(cleaned["counts"].items()) if v) or "nothing"
        what = (
            f"dropped {cleaned['dropped']['rows']} train rows"
            if cleaned.get("dropped")
            else "report only, nothing dropped"
        )
        say(
            f"[effray run] clean: {found} ({what}{'; kept from the last run' if cleaned['kept'] else ''}): "
            f"{Path(plan.clean.out) / 'clean_report.md'}"
        )

    t = _stage("train the teacher")
    train_cfg = plan.train
    progress, follow = _teacher_bar(out / "teacher" / "teacher", train_cfg.epochs)
    with follow:
        trained = train(train_cfg)
    progress.close()
    teacher = trained.get("checkpoint")
    if not teacher:
        raise EffrayError(f"the teacher run in {out / 'teacher'} produced no checkpoint; see its log above")
    timings["train_s"] = time.time() - t
    say(
        f"[effray run] teacher: val accuracy {trained.get('val_accuracy', float('nan')):.4f} "
        f"({timings['train_s']:.0f} s)"
    )

    if cfg.clean != "off":
        issues = val_label_issues(teacher, plan.tune.data, Path(plan.clean.out) / "val_label_issues.parquet")
        cleaned["val_label_issues"] = issues
        say(
            f"[effray run] {issues} possible label issues in val (cleanlab on the teacher's predictions): "
            f"{Path(plan.clean.out) / 'val_label_issues.parquet'}"
        )

    t = _stage("search the compression space")
    tune_cfg = dataclasses.replace(plan.tune, teacher=str(teacher))
    searched = tune_compression(tune_cfg, callbacks=[TrialProgress(trial_count(tune_cfg))])
    timings["tune_s"] = time.time() - t
    say(
        f"[effray run] search: {searched['measured']} measured, {searched['stopped_early']} stopped early, "
        f"{searched['errored']} errored ({timings['tune_s']:.0f} s)"
    )

    t = _stage("report")
    summary = report(ReportConfig(experiment=searched["experiment"], max_size_kb=cfg.max_size_kb))
    timings["report_s"] = time.time() - t
    results = Path(summary["report"]).with_name("results.parquet")
    pick = (summary.get("budget_pick") or {}).get("trial_id") or _most_accurate(results)  # no budget: the best model

    t = _stage("export the front")
    exports = export_front(results, pick, out / "export", data_dir)
    timings["export_s"] = time.time() - t
    for tid, e in exports.items():
        if e["error"]:
            say(f"[effray run] export {tid}: {e['error']}")

    say(
        f"[effray run] the front ({summary['pareto'].get('bytes', 0)} non-dominated of {summary['trials']} measured, "
        f"hypervolume {summary.get('hypervolume', float('nan')):.4f}; * the most accurate"
        f"{f' within {cfg.max_size_kb:g} KB' if cfg.max_size_kb else ''}):"
    )
    for line in front_table(results, searched.get("teacher"), pick):
        say(line)
    say(f"[effray run] report: {summary['report']}")
    say(f"[effray run] exported (.pt2 + ONNX, each checked against its artifact): {out / 'export'}/<trial>")
    if pick and pick in exports:
        model, kind = exports[pick]["dir"], "onnx-int8" if exports[pick]["int8"] else "onnx"
        say(f"[effray run] serve the pick:   effray serve --model {model} --kind {kind}")
        say(
            f"[effray run] batch inference:  effray predict --model {model} --kind {kind} --data {cfg.source} "
            f"--out {out / 'predictions'}"
        )
    return {
        "report": summary["report"],
        "pareto_png": str(Path(summary["report"]).with_name("pareto.png")),
        "teacher": {"checkpoint": teacher, "val_accuracy": trained.get("val_accuracy")},
        "trials": summary["trials"],
        "front": summary["pareto"].get("bytes", 0),
        "hypervolume": summary.get("hypervolume"),
        "best_accuracy": summary["best_accuracy"],
        "budget_pick": summary.get("budget_pick"),
        "exports": exports,
        "clean": cleaned,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
