"""``report.md``: the measured trials as a Markdown table, read against the teacher.

The table shows the scores and costs, the Pareto marks, and only the config fields that
vary between trials; the trials that ended early get their own table, with the rung
where they were stopped and who dominated them, so a surprising stop can be explained.
The calibration section reads each front model's and the teacher's ECE before and after
post-hoc temperature scaling (:func:`effray.metrics.scaled_calibration`). Everything was
chosen on val; when the search scored its front on a test split
(:mod:`effray.search.holdout`), a section gives those accuracies with their intervals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from effray.compress.config import parse_layers
from effray.search.fronts import on_a_front
from effray.search.results import BEYOND, OBJECTIVES

PER_LAYER = (".layer_bits", ".layer_rates")


def markdown(
    table: pd.DataFrame,
    teacher: dict[str, Any] | None,
    pick: pd.Series | None,
    max_size_kb: float | None,
    max_latency_ms: float | None,
    stopped: pd.DataFrame,
    hv: float | None,
    objective: str = "accuracy",
    test: dict[str, Any] | None = None,
    limits: str = "",
) -> str:
    """The report: the teacher's line, how to read the table, the hypervolume, the measured
    trials (the teacher's row first), the test split's estimate of the front, then those that
    ended early and the budget's pick."""
    cols = _columns(table)
    lines = ["# effray compression report", ""]
    if teacher:
        beyond = "".join(f", {k.replace('_', ' ')} {_fmt(teacher[k])}" for k in BEYOND if teacher.get(k) is not None)
        lines += [
            f"Teacher: accuracy {_fmt(teacher.get('accuracy'))}{beyond}, {_fmt(teacher.get('bytes'))} bytes, "
            f"{_fmt(teacher.get('macs'))} MACs, {_fmt(teacher.get('latency_ms'))} ms.",
            "",
        ]
        if teacher.get("deployed_latency_ms_b1") is not None:
            lines += [
                f"Latency is each trial's exported file ({teacher['deploy']}) on {teacher['runtime']} at "
                f"{teacher['latency_threads']} thread(s), timed in one run beside the teacher's fp32 "
                f"{teacher['deploy_kind']} file (BN folded, the runtime's graph optimisations on): speedup_b1 and "
                f"speedup_bN are teacher ÷ trial at batch 1 and at batch {teacher['batch_N']}, and "
                f"slower_than_teacher marks a trial the teacher outruns at either; {teacher['latency_cpu']}. The "
                f"eager PyTorch module's latency is eager_latency_ms in results.csv.",
                "",
            ]
    lines += [
        f"{len(table)} measured trials, sorted by accuracy. ★ marks Pareto-optimal rows (accuracy vs that cost; "
        "pareto_robust_bytes: mean corruption accuracy vs bytes). macro_f1, worst_class_recall and ece (15-bin "
        "expected calibration error) are on the val split; corruption_accuracy is the mean accuracy under the "
        "search's corruptions and severities.",
        "",
    ]
    if hv is not None:
        lines += [
            f"Hypervolume of the accuracy-vs-bytes front: **{hv:.4f}** (the area it dominates in accuracy × "
            "ln(bytes), from accuracy 0 and the teacher's fp32 size).",
            "",
        ]
    lines += _header(cols)
    if teacher:  # the baseline every score is read against
        base = {**teacher, "trial_id": "teacher (fp32)", "size_ratio": 1.0}
        lines += [_row(_fmt(base[c]) if base.get(c) is not None and not c.startswith("pareto_") else "" for c in cols)]
    lines += [_row(_cell(c, row[c]) for c in cols) for _, row in table.iterrows()]
    lines += _test_section(table, teacher, test)
    lines += _calibration_section(table, teacher)
    lines += _allocation_section(table)
    if len(stopped):
        lines += _stopped_section(stopped, cols)
    if max_size_kb or max_latency_ms or limits:
        lines += _budget_section(pick, max_size_kb, max_latency_ms, objective, limits)
    return "\n".join(lines) + "\n"


def _columns(table: pd.DataFrame) -> list[str]:
    """Scores, costs and Pareto marks, then the config fields that differ between trials
    (the constants of the space and the predicted costs would only repeat)."""
    cols = [
        c
        for c in (
            "trial_id",
            "accuracy",
            *BEYOND,
            "bytes",
            "macs",
            "latency_ms",
            "runtime",
            "img_s_bN",
            "speedup_b1",
            "speedup_bN",
            "slower_than_teacher",
            "deploy_agreement",
            "size_ratio",
            "pareto_bytes",
            "pareto_macs",
            "pareto_latency_ms",
            "pareto_robust_bytes",
        )
        if c in table
    ]
    cols += [c for c in table.columns if c.startswith(("latency_ms_b1@", "speedup_b1@", "pareto_latency_ms_b1@"))]
    cols += [c for c in ("deploy_error",) if c in table]
    cols += [c for c in ("predicted_bytes", "setup_s") if c in table]
    cols += [
        c
        for c in table.columns
        if c.startswith("config.")
        and not c.startswith(("config.predicted.", "config.context."))
        and not c.endswith(PER_LAYER)  # a cell per layer: the allocation section's
        and table[c].nunique(dropna=False) > 1
    ]
    return cols


def _allocation_section(table: pd.DataFrame) -> list[str]:
    """Each front model's per-layer bits and rates (``bits/rate``), layers as rows: what a
    sensitivity allocation chose where the uniform config gave every layer the same."""
    bits_col, rates_col = (next((c for c in table if c.endswith(k)), None) for k in PER_LAYER)
    if bits_col is None and rates_col is None:
        return []
    front = table[on_a_front(table)]
    allocated = [
        (
            str(r["trial_id"]),
            parse_layers(r.get(bits_col) or "", "layer_bits", int),
            parse_layers(r.get(rates_col) or "", "layer_rates", float),
        )
        for _, r in front.iterrows()
        if (bits_col and isinstance(r.get(bits_col), str) and r[bits_col])
        or (rates_col and isinstance(r.get(rates_col), str) and r[rates_col])
    ]
    if not allocated:
        return []
    layers = list(dict.fromkeys(n for _, b, r in allocated for n in [*b, *r]))
    lines = [
        "",
        "## Per-layer allocation",
        "",
        "Weight bits / unstructured prune rate of every layer, for each front model with a per-layer allocation "
        "(`allocation: sensitivity` chooses them from the teacher's per-layer sensitivities to cost at most the "
        "uniform config's bytes; `-` = the layer keeps its float weights / is not pruned).",
        "",
        *_header(["layer", *(t for t, _, _ in allocated)]),
    ]
    for name in layers:
        cells = [f"{b.get(name, '-')}/{r[name]:g}" if name in r else f"{b.get(name, '-')}" for _, b, r in allocated]
        lines.append(_row([name, *cells]))
    return lines


def _calibration_section(table: pd.DataFrame, teacher: dict[str, Any] | None) -> list[str]:
    """ECE and NLL before -> after temperature scaling, with T, for the teacher and every
    model on a front (all rows when there are no Pareto marks)."""
    front = table[on_a_front(table)]
    rows = [("teacher (fp32)", teacher)] if teacher and teacher.get("temperature") is not None else []
    if "temperature" in front:
        rows += [(str(r["trial_id"]), r) for _, r in front.iterrows() if pd.notna(r["temperature"])]
    if not rows:
        return []
    lines = [
        "",
        "## Calibration: post-hoc temperature scaling",
        "",
        "T divides each model's logits before the softmax (Guo et al. 2017): fitted by NLL on the val split, "
        "and ECE and NLL after it are scored on that same split, so they are optimistic (selection-biased); a "
        "held-out split would give the honest figure. T moves no prediction, only the confidence. Each front "
        "model's artifact records its T and its exports' probabilities use it; the teacher's is reported only.",
        "",
        *_header(["model", "temperature", "ece before → after", "nll before → after"]),
    ]
    for name, r in rows:
        cells = [f"{_fmt(r.get(a))} → {_fmt(r.get(b))}" for a, b in (("ece", "ece_scaled"), ("nll", "nll_scaled"))]
        lines.append(_row([name, _fmt(r.get("temperature")), *cells]))
    return lines


def _test_section(table: pd.DataFrame, teacher: dict[str, Any] | None, test: dict[str, Any] | None) -> list[str]:
    """The teacher and the front on the test split: accuracy (95 % interval) beside the val
    accuracy they were chosen by, worst-class recall, and ECE after the T fitted on val."""
    lines = ["", "## Held-out test split", ""]
    if not test:
        return [
            *lines,
            "The dataset has no test split, so every accuracy above is the val score the trials were chosen by: "
            "optimistic for the best of many. Prepare with `--test-fraction` (the default carves one) for an estimate.",
        ]
    lines += [
        f"Trials were stopped, ranked and picked on val; the {test['images']} test images were read once, after "
        "the search, for the teacher and every model on a front. The interval is the 95 % Wilson interval of "
        "the test accuracy; val − test is the selection's optimism (noise included). ECE on test uses the "
        "temperature each model fitted on val.",
        "",
        *_header(
            ["model", "val accuracy", "test accuracy", "95 % interval", "val − test", "worst class", "ece (val T)"]
        ),
    ]
    rows = [("teacher (fp32)", (teacher or {}).get("accuracy"), test["teacher"])]
    if "test_accuracy" in table:
        for _, r in table[table["test_accuracy"].notna()].iterrows():
            scores = {k: r[f"test_{k}"] for k in ("accuracy", "accuracy_low", "accuracy_high", "worst_class_recall")}
            rows.append((str(r["trial_id"]), r["accuracy"], {**scores, "ece_scaled": r["test_ece_scaled"]}))
    for name, val, t in rows:
        gap = _fmt(val - t["accuracy"]) if val is not None else ""
        interval = f"[{t['accuracy_low']:.4f}, {t['accuracy_high']:.4f}]"
        lines.append(
            _row(
                [
                    name,
                    _fmt(val) if val is not None else "",
                    _fmt(t["accuracy"]),
                    interval,
                    gap,
                    _fmt(t.get("worst_class_recall")),
                    _fmt(t.get("ece_scaled")),
                ]
            )
        )
    return lines


def _stopped_section(stopped: pd.DataFrame, cols: list[str]) -> list[str]:
    """The trials that ended before their final measurement: where, and who beat them."""
    scols = [
        c
        for c in ("trial_id", "outcome", "rung", "val_accuracy", "predicted_bytes", "rank", "dominated_by", "reason")
        if c in stopped
    ]
    scols += [c for c in cols if c.startswith("config.") and c in stopped]
    lines = [
        "",
        f"## Ended before their final measurement ({len(stopped)})",
        "",
        "Stopped early at the rung (epoch) shown, with the accuracy it had there and its predicted size; "
        "rank is its non-dominated front at that rung, dominated_by the trials that beat it in both; "
        "reason 'below the accuracy floor' (or the val_worst_class_recall floor, or above the val_ece_scaled "
        "ceiling): it could no longer reach --max-drop (or --max-worst-class-drop, --max-ece).",
        "",
    ]
    return lines + _header(scols) + [_row(_fmt(row[c]) for c in scols) for _, row in stopped.iterrows()]


def _budget_section(
    pick: pd.Series | None, max_size_kb: float | None, max_latency_ms: float | None, objective: str, limits: str = ""
) -> list[str]:
    budget = ", ".join(
        b
        for b in (
            f"≤ {max_size_kb} KB" if max_size_kb else "",
            f"≤ {max_latency_ms} ms" if max_latency_ms else "",
            limits,
        )
        if b
    )
    if limits:  # NNCF's max_drop answer: the cheapest model within every limit, judged on val against the teacher
        title = f"## Cheapest within the limits ({budget}; on val, against the teacher)"
    else:
        title = f"## Best within budget ({budget}), by {OBJECTIVES[objective].replace('_', ' ')}"
    lines = ["", title, ""]
    if pick is None:
        return [*lines, "No trial meets these limits." if limits else "No trial fits this budget."]
    robust = f", corruption accuracy {_fmt(pick['corruption_accuracy'])}" if "corruption_accuracy" in pick else ""
    if pd.notna(pick.get("test_accuracy")):
        robust += f"; on test: accuracy {_fmt(pick['test_accuracy'])}"
    return [
        *lines,
        f"Trial {pick['trial_id']}: accuracy {_fmt(pick['accuracy'])}{robust}, {int(pick['bytes'])} bytes, "
        f"artifact `{pick.get('artifact')}`",
    ]


def _header(cols: list[str]) -> list[str]:
    return [_row(cols), "|" + "---|" * len(cols)]


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(column: str, value: Any) -> str:
    """A table cell: a Pareto mark as ★, a trial the teacher outruns as "slower"."""
    if column == "slower_than_teacher":
        return "slower" if value is True or value is np.True_ else ""
    return _fmt(value)


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "★" if value else ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)
