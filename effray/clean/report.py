"""The cleaning step's outputs: removed.parquet, clean_report.json/.md and the PNG grids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effray.atomic import write_file, write_json
from effray.data.arrays import load_arrays

REMOVED = pa.schema(
    [
        ("split", pa.string()),
        ("index", pa.int64()),
        ("reason", pa.string()),
        ("match", pa.string()),
        ("duplicate_of_split", pa.string()),
        ("duplicate_of_index", pa.int64()),
        ("score", pa.float64()),
        ("given", pa.int64()),
        ("predicted", pa.int64()),
        ("given_confidence", pa.float64()),
        ("predicted_confidence", pa.float64()),
        ("dropped", pa.bool_()),
    ]
)


def write_removed(path: Path, findings: list[dict[str, Any]]) -> None:
    """One row per finding (a row flagged twice, say leak and label issue, appears twice)."""
    cols = {f.name: [r.get(f.name) for r in findings] for f in REMOVED}
    cols["given"] = [r.get("given", r.get("label")) for r in findings]
    table = pa.table({k: pa.array(v, REMOVED.field(k).type) for k, v in cols.items()}, schema=REMOVED)
    write_file(path, lambda tmp: pq.write_table(table, tmp))


def summarise(findings: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Counts per reason, per reason and split, per reason and (given) class, per leak match."""
    per_class: dict[str, dict[str, int]] = {}
    per_split: dict[str, dict[str, int]] = {}
    for r in findings:
        given = r.get("given", r.get("label"))
        c = per_class.setdefault(r["reason"], {})
        c[classes[given]] = c.get(classes[given], 0) + 1
        s = per_split.setdefault(r["reason"], {})
        s[r["split"]] = s.get(r["split"], 0) + 1
    return {
        "counts": dict(sorted(Counter(r["reason"] for r in findings).items())),
        "per_split": per_split,
        "per_class": per_class,
        "matches": {
            reason: dict(Counter(r["match"] for r in findings if r["reason"] == reason))
            for reason in ("duplicate", "near_duplicate", "leak")
        },
    }


def markdown(report: dict[str, Any]) -> str:
    """clean_report.md: the same figures as the JSON, for people."""
    lines = [
        f"# Cleaning report: {report['data']}",
        "",
        f"Dataset checksum `{report['data_checksum']}`; rows {report['rows']}"
        + (f"; reference `{report['reference']}` ({report['reference_rows']} rows)" if report.get("reference") else "")
        + ".",
        "",
        "| reason | rows | " + " | ".join(report["classes"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in report["classes"]) + " |",
    ]
    for reason, n in report["counts"].items():
        per = report["per_class"].get(reason, {})
        lines.append(f"| {reason} | {n} | " + " | ".join(str(per.get(c, 0)) for c in report["classes"]) + " |")
    if not report["counts"]:
        lines.append("| (nothing flagged) | 0 | " + " | ".join("0" for _ in report["classes"]) + " |")
    leak = report["matches"].get("leak") or {}
    lines += [
        "",
        f"Leaks: {leak.get('exact', 0)} exact, {leak.get('near', 0)} near (train rows only; the evaluation side and "
        "the reference are never touched).",
    ]
    near = report.get("near")
    if near:
        lines += [
            "",
            "## Near duplicates",
            "",
            f"Threshold **{near['threshold']:.4f}** ({near['source']}). {near['meaning']}",
            "",
            f"Definition: {near['definition']}.",
            f"Embedding: {near['embedding']}",
            "",
            "| copy kind | recall at the threshold |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in near["recall_per_kind"].items()]
    labels = report.get("labels")
    if labels:
        lines += [
            "",
            "## Label issues",
            "",
            f"{labels['method']}; train: {labels['folds']}-fold out-of-sample probabilities "
            f"(fold accuracy {', '.join(f'{a:.3f}' for a in labels['fold_accuracy'])}); evaluation splits: "
            f"{labels['eval_model']}"
            + (f" (accuracy {labels['eval_accuracy']})" if labels.get("eval_accuracy") else "")
            + ".",
            "",
        ]
        if labels["top"]:
            lines += [
                "| split | index | given | predicted | p(given) | p(predicted) |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| {t['split']} | {t['index']} | {t['given']} | {t['predicted']} | {t['given_confidence']:.3f} | "
                f"{t['predicted_confidence']:.3f} |"
                for t in labels["top"]
            ]
    dropped = report.get("dropped")
    lines += ["", "## Output", ""]
    if dropped:
        lines.append(
            f"Dropped {dropped['rows']} rows ({', '.join(dropped['reasons'])}) into `data/`: {dropped['counts']} "
            "remain."
        )
    else:
        lines.append("Report only: nothing dropped (pass --drop duplicates,leaks,labels to write a cleaned dataset).")
    lines += [f"- `{name}`" for name in report["files"]]
    return "\n".join(lines) + "\n"


def save_pairs_grid(path: Path, pairs: list[tuple[np.ndarray, np.ndarray, str]]) -> None:
    """Flagged row | the row it copies, side by side, a caption above each pair."""
    _grid(
        path,
        [(np.concatenate([a, np.full((a.shape[0], 2, a.shape[2]), 255, np.uint8), b], 1), c) for a, b, c in pairs],
        "duplicate pairs: flagged row (left), its match (right)",
    )


def save_issue_grid(path: Path, items: list[tuple[np.ndarray, str]]) -> None:
    _grid(path, items, "label issues: given -> predicted (confidence)")


def _grid(path: Path, items: list[tuple[np.ndarray, str]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 1.6 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, items):
        ax.imshow(
            image[:, :, 0] if image.shape[2] == 1 else image,
            cmap="gray" if image.shape[2] == 1 else None,
            interpolation="nearest",
        )
        ax.set_title(caption, fontsize=7)
    if not items:
        axes.flat[0].text(0.5, 0.5, "nothing flagged", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any]) -> None:
    write_json(out / "clean_report.json", report)
    write_file(out / "clean_report.md", lambda tmp: tmp.write_text(markdown(report)))


def save_grids(
    out: Path,
    findings: list[dict[str, Any]],
    data: str,
    train: dict[str, np.ndarray],
    ref: tuple[str, dict[str, Any]] | None,
    classes: list[str],
    groups: int,
) -> None:
    """``out/duplicates.png`` (the highest-scoring pairs of each reason) and
    ``out/label_issues.png`` (the least self-confident issues), ``groups`` of each at most;
    the images of a split other than train are read when a finding first needs one."""
    cache: dict[str, dict[int, np.ndarray]] = {"train": dict(zip(train["index"].tolist(), train["image"]))}

    def image(origin: str, index: int) -> np.ndarray:
        if origin not in cache:
            d, splits = (ref[0], ref[1]["splits"]) if origin == "reference" else (data, [origin])
            cache[origin] = {}
            for s in splits:
                a = load_arrays(d, s)
                cache[origin].update(zip(a["index"].tolist(), a["image"]))
        return cache[origin][index]

    dups = [f for f in findings if f["duplicate_of_index"] is not None]
    per = max(1, groups // max(1, len({f["reason"] for f in dups})))
    chosen = []
    for reason in ("leak", "duplicate", "near_duplicate"):
        chosen += sorted((f for f in dups if f["reason"] == reason), key=lambda f: -f["score"])[:per]
    save_pairs_grid(
        out / "duplicates.png",
        [
            (
                image(f["split"], f["index"]),
                image(f["duplicate_of_split"], f["duplicate_of_index"]),
                f"{f['reason']} ({f['match']}) {f['score']:.3f}\n{f['split']} {f['index']} ~ "
                f"{f['duplicate_of_split']} {f['duplicate_of_index']}",
            )
            for f in chosen[:groups]
        ],
    )
    issues = sorted((f for f in findings if f["reason"] == "label_issue"), key=lambda f: f["given_confidence"])
    save_issue_grid(
        out / "label_issues.png",
        [
            (
                image(f["split"], f["index"]),
                f"{f['split']} {f['index']}: {classes[f['given']]} -> "
                f"{classes[f['predicted']]}\n({f['predicted_confidence']:.2f})",
            )
            for f in issues[:groups]
        ],
    )
