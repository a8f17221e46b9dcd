"""The end of ``effray run``: the accuracy-vs-bytes front of the search as a table, the
model to pick from it, and every model on it exported and checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from effray.atomic import write_json
from effray.config import validated
from effray.console import bar
from effray.deploy.config import ExportConfig
from effray.deploy.export import export
from effray.deploy.model import SIDECAR
from effray.errors import EffrayError


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
    """The accuracy-vs-bytes front of a report's results, as terminal lines (``*``: the pick).
    When the search timed its exports, the latency columns are the exported file's on its
    runtime and its speed-ups against the teacher's file on the same runtime, at batch 1 and
    at the throughput batch N; ``slower`` marks a model the teacher outruns at either."""
    table = pd.read_parquet(results)
    front = table[table["pareto_bytes"]].sort_values("bytes")
    size = teacher.get("bytes") if teacher else None
    deployed = "speedup_b1" in front and front["speedup_b1"].notna().any()
    n = int(front["batch_N"].dropna().iloc[0]) if deployed else 0
    speed = f"{'ms (b1)':>9}{'x b1':>7}{f'x b{n}':>8}" if deployed else f"{'ms (b1)':>9}"
    tested = "test_accuracy" in front and front["test_accuracy"].notna().any()
    head = f"{'val acc.':>9}{'test':>8}" if tested else f"{'accuracy':>9}"
    lines = [f"  {'trial':<10}{head}{'macro-F1':>9}{'corrupt.':>9}{'KB':>8}{'smaller':>9}{speed}  config"]
    for _, r in front.iterrows():
        how = config_summary(r)
        smaller = f"{size / r['bytes']:.1f}x" if size else ""
        c = r.get("corruption_accuracy")
        corrupt = f"{c:.4f}" if c is not None and c == c else "-"  # '-': not measured (absent or NaN)
        star = "*" if r["trial_id"] == pick else " "
        if deployed and r.get("speedup_b1") == r.get("speedup_b1"):  # not NaN: the file was timed
            slower = "  slower" if r.get("slower_than_teacher") else ""
            timing = f"{r['latency_ms']:>9.3f}{r['speedup_b1']:>6.2f}x{r['speedup_bN']:>7.2f}x"
            how += slower
        elif deployed:
            why = r.get("deploy_error") if isinstance(r.get("deploy_error"), str) else ""
            timing, how = f"{'-':>9}{'-':>7}{'-':>8}", f"{how}  (no deployable file: {why[:60]})"
        else:
            timing = f"{r['latency_ms']:>9.3f}"
        test = f"{r['test_accuracy']:>8.4f}" if tested else ""
        lines.append(
            f" {star}{r['trial_id']:<10}{r['accuracy']:>9.4f}{test}{r.get('macro_f1', float('nan')):>9.4f}"
            f"{corrupt:>9}{r['bytes'] / 1024:>8.1f}{smaller:>9}{timing}  {how}"
        )
    return lines


def holdout_line(test: dict[str, Any] | None, pick: str | None) -> str:
    """The test split's verdict on the search's choice, in one line: the teacher's and the
    pick's test accuracy with their 95 % intervals (val chose; test was read once, after)."""
    if not test:
        return "no test split: the accuracies are the val scores the search chose by (prepare with --test-fraction)"

    def scored(s: dict[str, Any]) -> str:
        return f"{s['accuracy']:.4f} [{s['accuracy_low']:.4f}, {s['accuracy_high']:.4f}]"

    chosen = test["front"].get(pick or "")
    picked = f"; the pick {scored(chosen)} (val {chosen['val_accuracy']:.4f})" if chosen else ""
    return (
        f"test split ({test['images']} images, never trained on or chosen by; {test['interval']}): "
        f"teacher {scored(test['teacher'])}{picked}"
    )


def target_lines(results: str | os.PathLike) -> list[str]:
    """One line per ``--latency-on`` target after the first (whose speed-ups are the
    table's): each front model's speed-ups at batch 1 and batch N against the teacher's
    file on that target."""
    table = pd.read_parquet(results)
    front = table[table["pareto_bytes"]].sort_values("bytes")
    targets = [c.split("@", 1)[1] for c in table.columns if c.startswith("speedup_b1@")]
    lines = []
    for target in targets[1:]:
        cells = [
            f"{r['trial_id']} {r[f'speedup_b1@{target}']:.2f}x/{r.get(f'speedup_bN@{target}', float('nan')):.2f}x"
            for _, r in front.iterrows()
        ]
        lines.append(f"  on {target} (x b1 / x bN against the teacher there): {', '.join(cells)}")
    return lines


def latency_line(teacher: dict[str, Any] | None) -> str:
    """What the table's latency columns were measured on: the runtime, its threads, the
    batches, the teacher's own figures there and the CPU ('' when the search did not deploy)."""
    if not teacher or teacher.get("deployed_latency_ms_b1") is None:
        return ""
    why = f" ({teacher['deploy_why']})" if teacher.get("deploy_why") else ""
    return (
        f"latency: the exported files on {teacher['runtime']} ({teacher['deploy']}){why}, "
        f"{teacher['latency_threads']} thread(s), against the teacher's fp32 {teacher['deploy_kind']} file there "
        f"({teacher['deployed_latency_ms_b1']:.3f} ms at batch 1, {teacher['deployed_img_s_bN']:,.0f} img/s at batch "
        f"{teacher['batch_N']}); {teacher['latency_cpu']}"
    )


def serve_kind(int8: bool, teacher: dict[str, Any] | None) -> str:
    """The ONNX file the pick's serve and predict lines name: int8 when it was written, unless
    the search's ``--deploy`` chose fp32 (``auto`` measured it faster here, or it was asked
    for). The front exports ONNX and OpenVINO alike; other runtimes are a ``--kind`` away."""
    deployed = str((teacher or {}).get("deploy") or "")
    return "onnx-int8" if int8 and (not deployed or deployed.endswith("int8")) else "onnx"


def pick_lines(export: dict[str, Any], teacher: dict[str, Any] | None, source: str, predictions: Path) -> list[str]:
    """The commands that serve and batch-predict the pick: its exported file, or, when no file
    of it passed its parity check, its artifact (run in PyTorch), with a line saying so."""
    if export["error"]:
        model = f"--model {export['artifact']}"
        lines = ["the pick's exports failed their parity check (above), so these run its artifact in PyTorch:"]
    else:
        model = f"--model {export['dir']} --kind {serve_kind(export['int8'], teacher)}"
        lines = []
    return lines + [
        f"serve the pick:   effray serve {model}",
        f"batch inference:  effray predict {model} --data {source} --out {predictions}",
    ]


def export_front(results: str | os.PathLike, pick: str | None, out: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    """Export every model on the accuracy-vs-bytes front (and the budget pick, with its int8
    files) to ``out/<trial_id>`` as ``.pt2``, ONNX and OpenVINO, each parity-checked by
    :func:`effray.deploy.export.export`. ``out/exports.json`` records what was done, so a
    re-run keeps an export made from the same artifact (an int8 file that failed its check
    is not retried). A model that fails its check is reported, not fatal (the pick falls
    back to its fp32 files). On Ray the models export side by side, one CPU task each (an
    export is single-threaded tracing: the driver alone would leave the other cores idle).
    Returns ``{trial_id: {"dir", "int8", "error", "artifact"}}``."""
    table = pd.read_parquet(results)
    ids = list(dict.fromkeys(list(table.loc[table["pareto_bytes"], "trial_id"]) + ([pick] if pick else [])))
    state_file = out / "exports.json"
    state: dict[str, dict[str, Any]] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    progress = bar(len(ids), "export", "model")
    todo: list[tuple[str, str, Path, bool]] = []
    for tid in ids:
        artifact = str(Path(table.loc[table["trial_id"] == tid, "artifact"].iloc[0]).resolve())
        dest, int8 = out / tid, tid == pick
        kept = state.get(tid, {})
        if kept.get("artifact") == artifact and (dest / SIDECAR).is_file() and (kept.get("int8_tried") or not int8):
            progress.update(1)
        else:
            todo.append((tid, artifact, dest, int8))
    if ray.is_initialized() and len(todo) > 1:  # one model alone: a task's fresh worker would only add start-up
        pending = {_export_task.remote(artifact, dest, int8, data_dir): tid for tid, artifact, dest, int8 in todo}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            _record(state, state_file, pending.pop(ref), ray.get(ref))
            progress.update(1)
    else:
        for tid, artifact, dest, int8 in todo:
            _record(state, state_file, tid, export_model(artifact, dest, int8, data_dir))
            progress.update(1)
    progress.close()
    return {tid: {k: state[tid][k] for k in ("dir", "int8", "error", "artifact")} for tid in ids}


def export_model(artifact: str, dest: Path, int8: bool, data_dir: Path) -> dict[str, Any]:
    """One front model exported, with its int8 files when asked (one that fails its parity
    check is left out, ``deploy.json`` says why, and the fp32 files are kept): the record
    ``exports.json`` keeps of it; ``int8`` is whether the ONNX int8 file, the one served, is
    there."""
    record = {"dir": str(dest), "int8": False, "error": "", "artifact": artifact, "int8_tried": int8}
    try:
        summary = export(
            validated(
                ExportConfig(
                    artifact=artifact,
                    format="all",
                    int8=int8,
                    int8_fallback=True,
                    data=str(data_dir),
                    out=str(dest),
                    trust_code=True,  # this run's own artifacts, of the preset's models
                )
            )
        )
    except EffrayError as exc:
        return {**record, "error": str(exc)}
    return {**record, "int8": "onnx-int8" in summary["files"]}


_export_task = ray.remote(num_cpus=1)(export_model)


def _record(state: dict[str, dict[str, Any]], state_file: Path, tid: str, record: dict[str, Any]) -> None:
    """One finished export into ``exports.json``, written as each one finishes (a re-run after
    a kill keeps those)."""
    state[tid] = record
    state_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(state_file, state)


def most_accurate(results: str | os.PathLike) -> str | None:
    """The front's most accurate model (of equally accurate ones, the smallest)."""
    table = pd.read_parquet(results, columns=["trial_id", "accuracy", "bytes", "pareto_bytes"])
    front = table[table["pareto_bytes"]].sort_values(["accuracy", "bytes"], ascending=[False, True])
    return None if front.empty else str(front["trial_id"].iloc[0])
