"""``effray run``, top to bottom: prepare -> clean -> train the teacher -> search the
compression space -> report -> export the front, each stage the function its own command
calls, with the plan's configs (:func:`effray.run.plan.plan_stages`)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from effray.config import require
from effray.console import say
from effray.data.prepare import load_meta, prepare
from effray.errors import EffrayError
from effray.run.front import (
    export_front,
    front_table,
    holdout_line,
    latency_line,
    most_accurate,
    pick_lines,
    target_lines,
)
from effray.run.plan import RunConfig, check_live_cluster, plan_stages
from effray.run.stages import clean_stage, stage, teacher_bar, val_label_issues
from effray.search.aggregate import ReportConfig, report
from effray.search.config import TuneConfig
from effray.search.driver import trial_count, tune_compression
from effray.search.progress import TrialProgress
from effray.train import train


def _pick_rule(cfg: RunConfig, tune: TuneConfig, picked: bool) -> str:
    """How the starred model was chosen, as the front's header says it."""
    within = [f"{cfg.max_size_kb:g} KB"] if cfg.max_size_kb else []
    if tune.limits.active and picked:
        return f"the cheapest in {tune.objective} within {', '.join([*within, tune.limits.describe()])}"
    return f"the most accurate{f' within {within[0]}' if within else ''}"


def run_all(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage; returns where the report and the best artifacts are."""
    plan = plan_stages(cfg)
    check_live_cluster(cfg, plan)
    out = Path(os.path.abspath(cfg.out))
    data_dir = out / "data"
    timings: dict[str, float] = {}

    t = stage("prepare")
    source = plan.prepare.source  # --source, or the preset's own
    if (data_dir / "meta.json").is_file():
        meta = load_meta(data_dir)
        require(
            meta["source"].endswith(source.split(":", 1)[-1].lstrip("./")) or source in meta["source"],
            f"{data_dir} was prepared from {meta['source']}, not {source}; use another --out",
        )
    else:
        prepare(plan.prepare)
    timings["prepare_s"] = time.time() - t

    cleaned: dict[str, Any] = {}
    if cfg.clean != "off":
        t = stage("clean")
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

    t = stage("train the teacher")
    train_cfg = plan.train
    progress, follow = teacher_bar(out / "teacher" / "teacher", train_cfg.epochs)
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

    t = stage("search the compression space")
    tune_cfg = dataclasses.replace(plan.tune, teacher=str(teacher))
    searched = tune_compression(tune_cfg, callbacks=[TrialProgress(trial_count(tune_cfg))])
    timings["tune_s"] = time.time() - t
    say(
        f"[effray run] search: {searched['measured']} measured, {searched['stopped_early']} stopped early, "
        f"{searched['errored']} errored ({timings['tune_s']:.0f} s)"
    )

    t = stage("report")
    limits = plan.tune.limits
    summary = report(
        ReportConfig(
            experiment=searched["experiment"],
            max_size_kb=cfg.max_size_kb,
            limits=limits,
            cost=plan.tune.objective,
        )
    )
    timings["report_s"] = time.time() - t
    results = Path(summary["report"]).with_name("results.parquet")
    pick = (summary.get("budget_pick") or {}).get("trial_id") or most_accurate(results)  # no budget: the best model
    if limits.active and not summary.get("budget_pick"):
        say(f"[effray run] no trial meets the limits ({limits.describe()}); the most accurate is marked instead")

    t = stage("export the front")
    exports = export_front(results, pick, out / "export", data_dir)
    timings["export_s"] = time.time() - t
    for tid, e in exports.items():
        if e["error"]:
            say(f"[effray run] export {tid}: {e['error']}")

    say(
        f"[effray run] the front ({summary['pareto'].get('bytes', 0)} non-dominated of {summary['trials']} measured, "
        f"hypervolume {summary.get('hypervolume', float('nan')):.4f}; "
        f"* {_pick_rule(cfg, plan.tune, bool(summary.get('budget_pick')))}):"
    )
    for line in front_table(results, searched.get("teacher"), pick) + target_lines(results):
        say(line)
    say(f"[effray run] {holdout_line(summary.get('test'), pick)}")
    if latency_line(searched.get("teacher")):
        say(f"[effray run] {latency_line(searched.get('teacher'))}")
    say(f"[effray run] report: {summary['report']}")
    say(f"[effray run] exported (.pt2, ONNX, OpenVINO, each checked against its artifact): {out / 'export'}/<trial>")
    if pick and pick in exports:
        for line in pick_lines(exports[pick], searched.get("teacher"), source, out / "predictions"):
            say(f"[effray run] {line}")
    return {
        "report": summary["report"],
        "pareto_png": str(Path(summary["report"]).with_name("pareto.png")),
        "teacher": {"checkpoint": teacher, "val_accuracy": trained.get("val_accuracy")},
        "trials": summary["trials"],
        "front": summary["pareto"].get("bytes", 0),
        "hypervolume": summary.get("hypervolume"),
        "best_accuracy": summary["best_accuracy"],
        "budget_pick": summary.get("budget_pick"),
        "limits": summary.get("limits"),
        "test": summary.get("test"),
        "exports": exports,
        "clean": cleaned,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
